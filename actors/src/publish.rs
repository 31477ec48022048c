//! Publishing one store object from a source store into a binary cache: NAR streamed,
//! checked against its NarHash, compressed, written, then the listing, then the signed narinfo.
//!
//! Ordering across objects (references first) is the upload scheduler's job; this module
//! guarantees the per-object half: a narinfo is written only after its NAR is complete and
//! verified, so a reader never sees a narinfo pointing at a missing or wrong NAR.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::formats::hash::HashingCounter;
use crate::formats::{Compression, Digest, Hash, NarInfo, SecretKey};
use crate::store::{ByteStream, Result, Store, StoreError};

/// How objects are written.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// NAR compression.
    pub compression: Compression,
    /// Codec level; `None` for the codec's default.
    pub level: Option<i32>,
    /// Also write `<digest>.ls`.
    pub write_listing: bool,
    /// Also write the build log of the path's deriver (`log/<drv>`) when the source has it.
    pub write_logs: bool,
    /// Keys to sign narinfos with.
    pub keys: Vec<SecretKey>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            compression: Compression::Zstd,
            level: None,
            write_listing: true,
            write_logs: true,
            keys: Vec::new(),
        }
    }
}

/// What a stream hashed, filled in when it ends; or why it did not match.
type Tally = Arc<Mutex<Option<Result<(Hash, u64), String>>>>;

/// Hashes and counts a stream as it passes; when `expect` is set, a mismatch at the end
/// becomes an error *in* the stream, so the consumer (an atomic put) aborts instead of
/// committing bad bytes.
struct Hashing {
    inner: ByteStream,
    counter: Option<HashingCounter>,
    expect: Option<(Hash, u64)>,
    tally: Tally,
}

impl Stream for Hashing {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(c) = self.counter.as_mut() {
                    c.update(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => {
                let Some(counter) = self.counter.take() else {
                    return Poll::Ready(None);
                };
                let (hash, len) = counter.finish();
                if let Some((want_hash, want_len)) = &self.expect {
                    if *want_hash != hash || *want_len != len {
                        let msg = format!(
                            "NAR hash mismatch: expected {want_hash} ({want_len} bytes), got {hash} ({len} bytes); the store object changed or is corrupt"
                        );
                        *self.tally.lock().expect("tally") = Some(Err(msg.clone()));
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            msg,
                        ))));
                    }
                }
                *self.tally.lock().expect("tally") = Some(Ok((hash, len)));
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

fn hashing(inner: ByteStream, expect: Option<(Hash, u64)>) -> (ByteStream, Tally) {
    let tally: Tally = Arc::default();
    let s = Hashing {
        inner,
        counter: Some(HashingCounter::new()),
        expect,
        tally: tally.clone(),
    };
    (Box::pin(s), tally)
}

/// Recasts an error the destination gave while being written as a backend error.
///
/// "Not found", "corrupt" or "invalid" from a destination never means the path itself is
/// bad (only the source can say that): a resumable upload whose session the server lost
/// answers 404, a half-written object reads as corrupt. Given as they are, the uploader would
/// take them for faults of the path and give up on it; as backend errors they are retried.
pub fn destination_error(e: StoreError) -> StoreError {
    let transient = match e {
        StoreError::NotFound(_)
        | StoreError::Corrupt(_)
        | StoreError::RangeNotSatisfiable { .. } => true,
        // Only a change at the destination helps; the uploader still retries and says so.
        StoreError::Invalid(_) | StoreError::Unsupported(_) => false,
        other => return other,
    };
    StoreError::backend_flagged("the destination answered", e.to_string(), transient)
}

/// Copies the object with store-path digest `digest` from `source` into `dest`.
///
/// Existing signatures are kept and each key in `opts.keys` adds its own. Just before the
/// narinfo is written, each reference is looked for in `dest`, and one that is missing is
/// written first (from `source`, the same way). Returns the narinfo written.
pub async fn publish(
    source: &dyn Store,
    dest: &dyn Store,
    digest: &Digest,
    opts: &PublishOptions,
) -> Result<NarInfo> {
    write_path(source, dest, digest, opts, true).await
}

/// Like [`publish`], without looking for the references: the caller vouches for them (the
/// destination may still refuse the path, as a remote Nix does).
pub async fn publish_path(
    source: &dyn Store,
    dest: &dyn Store,
    digest: &Digest,
    opts: &PublishOptions,
) -> Result<NarInfo> {
    write_path(source, dest, digest, opts, false).await
}

async fn write_path(
    source: &dyn Store,
    dest: &dyn Store,
    digest: &Digest,
    opts: &PublishOptions,
    check_references: bool,
) -> Result<NarInfo> {
    let src_info = source.narinfo(digest).await?;
    let blob = source.nar(&src_info.url, None).await?;
    // Bring the NAR to its uncompressed form, whatever the source stores.
    let nar: ByteStream = if src_info.compression == Compression::None {
        blob.stream
    } else {
        let reader = tokio::io::BufReader::new(StreamReader::new(blob.stream));
        Box::pin(ReaderStream::with_capacity(
            src_info.compression.decoder(reader),
            256 * 1024,
        ))
    };
    let (nar, nar_tally) = hashing(nar, Some((src_info.nar_hash.clone(), src_info.nar_size)));
    // Uncompressed, the file is the NAR: its hash is already being taken once.
    let (compressed, file_tally): (ByteStream, Tally) = if opts.compression == Compression::None {
        (nar, nar_tally.clone())
    } else {
        // Flushed only at the end, so the file (and FileHash) is the same every run.
        hashing(opts.compression.compress_stream(nar, opts.level), None)
    };
    // Keyed by the NAR hash (known before compressing), so the NAR streams straight into
    // the destination with no temporary copy; the narinfo's URL is opaque to clients.
    let url = format!(
        "nar/{}.nar{}",
        crate::formats::nixbase32::encode(src_info.nar_hash.digest()),
        opts.compression.extension()
    );
    if let Err(e) = dest.put_nar(&url, compressed).await {
        // A NAR that does not match its hash is a permanent failure, not a flaky network.
        if let Some(Err(msg)) = nar_tally.lock().expect("tally").clone() {
            return Err(StoreError::Corrupt(format!(
                "{}: {msg}",
                src_info.store_path
            )));
        }
        return Err(destination_error(e));
    }
    let (file_hash, file_size) = match file_tally.lock().expect("tally").clone() {
        Some(Ok(t)) => t,
        _ => {
            return Err(StoreError::backend(
                format!("uploading {url}"),
                "the NAR stream ended early",
            ))
        }
    };

    if opts.write_listing {
        match source.listing(digest).await {
            Ok(json) => dest
                .put_listing(digest, &json)
                .await
                .map_err(destination_error)?,
            Err(StoreError::NotFound(_)) | Err(StoreError::Unsupported(_)) => {}
            Err(e) => return Err(e),
        }
    }

    if opts.write_logs {
        write_log(source, dest, &src_info).await;
    }

    let mut info = NarInfo {
        url,
        compression: opts.compression,
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        extra: Vec::new(),
        ..src_info
    };
    for key in &opts.keys {
        info.sign(key);
    }
    // Looked at again just before the narinfo goes out, not only when the upload began: a
    // collection may have removed a reference since (the scheduler found it present, then
    // this NAR took seconds or minutes). What is gone is written again first, so no narinfo
    // lands without its references.
    if check_references {
        write_missing_references(source, dest, &info, opts).await?;
    }
    dest.put_narinfo(&info).await.map_err(destination_error)?;
    write_realisations(source, dest, digest).await?;
    Ok(info)
}

/// Writes the build log of the path's deriver when the source has one, so `nix log` finds
/// it in the cache. A log helps someone debug a build; it is not part of the path, so one
/// that cannot be copied is reported and the path is written all the same.
async fn write_log(source: &dyn Store, dest: &dyn Store, info: &NarInfo) {
    let Some(drv) = info
        .deriver
        .as_deref()
        .filter(|d| *d != crate::formats::narinfo::UNKNOWN_DERIVER)
    else {
        return;
    };
    let blob = match source.log(drv).await {
        Ok(blob) => blob,
        // Most paths have no log here: substituted, or built elsewhere.
        Err(StoreError::NotFound(_) | StoreError::Unsupported(_) | StoreError::Invalid(_)) => {
            return
        }
        Err(e) => {
            tracing::warn!(
                "{}: its build log log/{drv} could not be read ({e}); the path is uploaded without it",
                info.store_path
            );
            return;
        }
    };
    match dest.put_log(drv, blob.stream).await {
        Ok(()) => tracing::debug!("{}: wrote log/{drv}", info.store_path),
        // A remote Nix store over ssh takes no logs.
        Err(StoreError::Unsupported(_)) => {}
        Err(e) => tracing::warn!(
            "{}: its build log log/{drv} was not written ({e}); the path is uploaded without it",
            info.store_path
        ),
    }
}

/// Writes the realisations whose output is this path (content-addressed derivations'
/// outputs built here), after its narinfo: a client that reads one can then substitute it.
async fn write_realisations(source: &dyn Store, dest: &dyn Store, digest: &Digest) -> Result<()> {
    for (id, json) in source.realisations_of(digest).await? {
        match dest.put_realisation(&id, &json).await {
            Ok(()) => tracing::debug!("wrote realisation {id}"),
            // A remote Nix store over ssh has no command for them.
            Err(StoreError::Unsupported(_)) => {}
            Err(e) => return Err(destination_error(e)),
        }
    }
    Ok(())
}

/// Writes again, references first, the references of `info` that the destination lacks.
fn write_missing_references<'a>(
    source: &'a dyn Store,
    dest: &'a dyn Store,
    info: &'a NarInfo,
    opts: &'a PublishOptions,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        for r in &info.references {
            if r.digest() == info.store_path.digest() {
                continue;
            }
            let key = format!("{}.narinfo", r.digest());
            if dest.exists(&key).await.map_err(destination_error)? {
                continue;
            }
            tracing::warn!(
                "{}: its reference {r} is gone from the destination (a collection removed it?); writing it again first",
                info.store_path
            );
            // `publish` checks the reference's own references the same way.
            publish(source, dest, r.digest(), opts).await?;
        }
        Ok(())
    })
}

/// Drains a stream, for callers that only need its side effects or size.
pub async fn drain(mut s: ByteStream) -> io::Result<u64> {
    let mut n = 0;
    while let Some(c) = s.next().await {
        n += c?.len() as u64;
    }
    Ok(n)
}
