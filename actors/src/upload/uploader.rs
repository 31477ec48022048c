//! An uploader actor: publishes one store object at a time into the destination.
//!
//! Each uploader runs on its own arbiter (thread), because compressing a NAR is CPU work
//! done inside the stream's poll: `--jobs` uploaders then really use `--jobs` cores.

use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, ResponseFuture};

use crate::formats::{NarInfo, StorePath};
use crate::publish::{destination_error, publish, PublishOptions};
use crate::store::{Store, StoreError};

/// Upload one object (its narinfo is written last; its references must already be there).
#[derive(Debug, Message)]
#[rtype(result = "Result<Uploaded, UploadFailure>")]
pub struct Upload(pub StorePath);

/// What an upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uploaded {
    /// The object was written.
    Published {
        /// Bytes of compressed NAR written.
        file_size: u64,
    },
    /// The destination had it; `new_signatures` were merged into its narinfo.
    Present {
        /// Signatures added to the existing narinfo.
        new_signatures: usize,
    },
}

/// Why an upload failed, and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct UploadFailure {
    /// True when retrying cannot help (the path is gone, its NAR does not match its hash).
    pub permanent: bool,
    /// What happened.
    pub message: String,
}

impl UploadFailure {
    fn from_store(what: &str, e: StoreError) -> UploadFailure {
        // Only a fault of the path itself is permanent. A destination that refuses for now
        // (refused credentials, a bucket not created yet) is retried with backoff: the path
        // stays journaled and fixing the destination resumes it, so nothing is given up on.
        let permanent = matches!(
            e,
            StoreError::NotFound(_)
                | StoreError::Corrupt(_)
                | StoreError::Invalid(_)
                | StoreError::Unsupported(_)
        );
        if !permanent && !e.is_transient() {
            tracing::error!(
                "{what}: {e}; this will not pass by itself: fix the destination, the path stays queued and is retried"
            );
        }
        UploadFailure {
            permanent,
            message: format!("{what}: {e}"),
        }
    }
}

/// Publishes objects from the local store into the destination.
pub struct Uploader {
    source: Arc<dyn Store>,
    dest: Arc<dyn Store>,
    opts: PublishOptions,
    force: bool,
}

impl Uploader {
    /// An uploader; with `force`, objects are written even when the destination has them.
    pub fn new(
        source: Arc<dyn Store>,
        dest: Arc<dyn Store>,
        opts: PublishOptions,
        force: bool,
    ) -> Uploader {
        Uploader {
            source,
            dest,
            opts,
            force,
        }
    }
}

impl Actor for Uploader {
    type Context = Context<Self>;
}

/// When the destination already has the object, adds the signatures it lacks (ours and the
/// local store's) instead of uploading again. Returns `None` when it must be uploaded.
async fn merge_existing(
    source: &dyn Store,
    dest: &dyn Store,
    opts: &PublishOptions,
    path: &StorePath,
) -> Result<Option<usize>, StoreError> {
    let existing = match dest.narinfo(path.digest()).await {
        Ok(n) => n,
        // Absent, or unreadable: (re)write it.
        Err(StoreError::NotFound(_)) | Err(StoreError::Corrupt(_)) => return Ok(None),
        Err(e) => return Err(destination_error(e)),
    };
    let local: NarInfo = source.narinfo(path.digest()).await?;
    if existing.nar_hash != local.nar_hash || existing.nar_size != local.nar_size {
        // Another build of the same path (non-deterministic builds): keep what is there.
        tracing::info!("{path}: the destination has a different NAR for this path; keeping it");
        return Ok(Some(0));
    }
    let mut merged = existing.clone();
    for s in &local.sigs {
        if !merged.sigs.contains(s) {
            merged.sigs.push(s.clone());
        }
    }
    merged.sign_if_missing(&opts.keys);
    let added = merged.sigs.len() - existing.sigs.len();
    if added > 0 {
        dest.put_narinfo(&merged).await.map_err(destination_error)?;
    }
    Ok(Some(added))
}

impl Handler<Upload> for Uploader {
    type Result = ResponseFuture<Result<Uploaded, UploadFailure>>;

    fn handle(&mut self, msg: Upload, _: &mut Context<Self>) -> Self::Result {
        let (source, dest, opts, force) = (
            self.source.clone(),
            self.dest.clone(),
            self.opts.clone(),
            self.force,
        );
        Box::pin(async move {
            let path = msg.0;
            if !force {
                match merge_existing(&*source, &*dest, &opts, &path).await {
                    Ok(Some(n)) => return Ok(Uploaded::Present { new_signatures: n }),
                    Ok(None) => {}
                    Err(e) => {
                        return Err(UploadFailure::from_store(
                            &format!("checking {path} in the destination"),
                            e,
                        ))
                    }
                }
            }
            tracing::info!("uploading {path}");
            match publish(&*source, &*dest, path.digest(), &opts).await {
                Ok(info) => Ok(Uploaded::Published {
                    file_size: info.file_size.unwrap_or(0),
                }),
                Err(e) => Err(UploadFailure::from_store(&format!("uploading {path}"), e)),
            }
        })
    }
}
