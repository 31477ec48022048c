//! Multipart uploads that are never left behind.
//!
//! S3 keeps (and bills) the parts of a multipart upload until it is completed or aborted.
//! An upload here is aborted when anything fails; when the abort itself fails (the fault that
//! broke the upload often breaks the abort too) or the upload is cancelled midway (its future
//! dropped at shutdown), it is remembered in [`Leftovers`] and aborted again before the next
//! write, so parts of an object that was never completed do not outlive the fault.
//! Only a process killed outright can leave one; a bucket lifecycle rule
//! (`AbortIncompleteMultipartUpload`) covers that.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use object_store::{MultipartUpload, PutPayload};
use tokio::task::JoinSet;

/// Multipart uploads still to abort, with the key each was for.
#[derive(Debug, Default)]
pub(super) struct Leftovers {
    uploads: Mutex<Vec<(String, Box<dyn MultipartUpload>)>>,
}

impl Leftovers {
    /// Aborts every remembered upload; those that fail again stay for the next sweep.
    pub(super) async fn sweep(&self) {
        let pending = std::mem::take(&mut *self.uploads.lock().expect("leftovers"));
        for (key, upload) in pending {
            abort_or_keep(self, key, upload).await;
        }
    }

    fn keep(&self, key: String, upload: Box<dyn MultipartUpload>) {
        self.uploads.lock().expect("leftovers").push((key, upload));
    }
}

async fn abort_or_keep(leftovers: &Leftovers, key: String, mut upload: Box<dyn MultipartUpload>) {
    match upload.abort().await {
        Ok(()) => tracing::info!("{key}: aborted an unfinished multipart upload"),
        // Already gone: completed by a request whose answer was lost, or aborted.
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(
                "{key}: cannot abort an unfinished multipart upload yet ({e}); trying again before the next write"
            );
            leftovers.keep(key, upload);
        }
    }
}

/// One multipart upload in progress: parts of `part_size` bytes, at most `in_flight` of
/// them uploading at once, so memory stays about `(in_flight + 1) * part_size`.
#[derive(Debug)]
pub(super) struct Parts {
    key: String,
    /// `None` once completed or aborted.
    upload: Option<Box<dyn MultipartUpload>>,
    tasks: JoinSet<object_store::Result<()>>,
    buf: BytesMut,
    part_size: usize,
    in_flight: usize,
    leftovers: Arc<Leftovers>,
}

impl Parts {
    /// Takes charge of `upload`: from here on it is completed or aborted, whatever happens.
    pub(super) fn new(
        key: &str,
        upload: Box<dyn MultipartUpload>,
        part_size: usize,
        in_flight: usize,
        leftovers: Arc<Leftovers>,
    ) -> Parts {
        Parts {
            key: key.to_owned(),
            upload: Some(upload),
            tasks: JoinSet::new(),
            buf: BytesMut::with_capacity(part_size),
            part_size,
            in_flight,
            leftovers,
        }
    }

    /// Adds bytes, sending each part as it fills; waits while `in_flight` parts are uploading.
    pub(super) async fn write(&mut self, mut data: Bytes) -> object_store::Result<()> {
        while !data.is_empty() {
            let room = self.part_size - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data.split_to(take));
            if self.buf.len() == self.part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn send_part(&mut self) -> object_store::Result<()> {
        while self.tasks.len() >= self.in_flight {
            self.join_one().await?;
        }
        let part = std::mem::replace(&mut self.buf, BytesMut::with_capacity(self.part_size));
        let upload = self.upload.as_mut().expect("upload in progress");
        self.tasks
            .spawn(upload.put_part(PutPayload::from(part.freeze())));
        Ok(())
    }

    async fn join_one(&mut self) -> object_store::Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            }),
            None => Ok(()),
        }
    }

    /// Sends what is left and completes the upload; on failure the upload is aborted.
    pub(super) async fn finish(mut self) -> object_store::Result<()> {
        let sent = async {
            if !self.buf.is_empty() {
                self.send_part().await?;
            }
            while !self.tasks.is_empty() {
                self.join_one().await?;
            }
            self.upload
                .as_mut()
                .expect("upload in progress")
                .complete()
                .await
        }
        .await;
        match sent {
            Ok(_) => {
                self.upload = None;
                Ok(())
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Stops the parts still uploading and aborts the upload (or leaves it to the next sweep).
    pub(super) async fn abort(mut self) {
        self.tasks.shutdown().await;
        if let Some(upload) = self.upload.take() {
            abort_or_keep(&self.leftovers, std::mem::take(&mut self.key), upload).await;
        }
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        // Cancelled midway (the future holding this was dropped): abort in the background,
        // or hand the upload to the next sweep when there is no runtime left to do it.
        let Some(upload) = self.upload.take() else {
            return;
        };
        let key = std::mem::take(&mut self.key);
        let leftovers = self.leftovers.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { abort_or_keep(&leftovers, key, upload).await });
            }
            Err(_) => leftovers.keep(key, upload),
        }
    }
}
