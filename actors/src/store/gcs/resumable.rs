//! Resumable uploads: objects too big for one request go up in chunks, and a chunk that
//! fails midway resumes from what GCS says it holds.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{HeaderValue, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Response, StatusCode};

use super::error::GcsError;
use super::retry::{retry_or_recover, ATTEMPTS};
use super::GcsBlobs;
use crate::store::{ByteStream, Result, StoreError};

/// Objects up to this size go up in one request; bigger ones as a resumable upload in chunks
/// of this size (GCS wants multiples of 256 KiB). Memory per upload is about two chunks.
pub(super) const CHUNK: usize = 8 * 1024 * 1024;

/// Bytes `[offset, offset + body.len())` of a resumable upload.
#[derive(Clone)]
struct Chunk<'a> {
    /// The upload session's URL.
    session: &'a str,
    body: Bytes,
    offset: u64,
    /// The object's size, given with the last chunk.
    total: Option<u64>,
    content_type: &'a str,
}

impl GcsBlobs {
    /// Starts a resumable upload; returns its session URL.
    async fn start_resumable(&self, name: &str, content_type: &str) -> Result<String, GcsError> {
        let url = self.upload_url("resumable", name);
        let meta = serde_json::json!({ "contentType": content_type }).to_string();
        let resp = self
            .send(|| {
                self.http
                    .post(&url)
                    .header(CONTENT_TYPE, "application/json; charset=UTF-8")
                    .header("X-Upload-Content-Type", content_type)
                    .body(meta.clone())
            })
            .await?;
        resp.headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| GcsError::Protocol("resumable upload started without a Location".into()))
    }

    /// Sends one chunk of an upload; returns how many bytes GCS now holds, or `None` once the
    /// object is complete.
    async fn send_chunk(&self, chunk: &Chunk<'_>) -> Result<Option<u64>, GcsError> {
        let Chunk {
            session,
            body,
            offset,
            total,
            content_type,
        } = chunk.clone();
        let total_s = total.map_or("*".to_owned(), |t| t.to_string());
        let range = if body.is_empty() {
            format!("bytes */{total_s}")
        } else {
            format!(
                "bytes {offset}-{}/{total_s}",
                offset + body.len() as u64 - 1
            )
        };
        // fake-gcs-server takes the object's type from the last chunk; GCS ignores it.
        self.put_to_session(session, range, Some(content_type), body)
            .await
    }

    /// Asks how much of an upload GCS holds, after a chunk failed midway.
    async fn upload_status(&self, session: &str) -> Result<Option<u64>, GcsError> {
        self.put_to_session(session, "bytes */*".into(), None, Bytes::new())
            .await
    }

    /// One PUT to an upload session (`Content-Range: range`), read as upload progress.
    async fn put_to_session(
        &self,
        session: &str,
        range: String,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Option<u64>, GcsError> {
        let mut req = self.http.put(session).header(CONTENT_RANGE, range);
        if let Some(t) = content_type {
            req = req.header(CONTENT_TYPE, t);
        }
        let resp = self.send_once(req.body(body)).await?;
        upload_progress(resp).await
    }

    /// One chunk, retried through transient failures by asking GCS where it got to.
    async fn send_chunk_retrying(&self, chunk: Chunk<'_>) -> Result<Option<u64>, GcsError> {
        retry_or_recover(
            || self.send_chunk(&chunk),
            || async {
                match self.upload_status(chunk.session).await {
                    Ok(Some(held)) if held > chunk.offset => Some(Some(held)),
                    Ok(None) => Some(None),
                    // Nothing new held, or no answer: send the chunk again.
                    _ => None,
                }
            },
        )
        .await
    }

    async fn cancel(&self, session: &str) {
        if let Ok(rb) = self
            .auth
            .authorize(self.http.delete(session), &self.options.bucket)
            .await
        {
            let _ = rb.send().await;
        }
    }

    /// Streams `data` up as a resumable upload, holding at most about two chunks.
    pub(super) async fn resumable(
        &self,
        key: &str,
        name: &str,
        mut buf: BytesMut,
        data: &mut ByteStream,
        content_type: &str,
    ) -> Result<u64> {
        let session = match self.start_resumable(name, content_type).await {
            Ok(s) => s,
            Err(e) => return Err(self.fail("writing", key, e).await),
        };
        let mut offset = 0u64;
        let mut eof = false;
        // Chunks in a row that GCS took none of; a server that never progresses must not
        // keep us resending forever.
        let mut stalls = 0;
        loop {
            if !eof {
                eof = match fill(&mut buf, data, CHUNK + 1).await {
                    Ok(eof) => eof,
                    Err(e) => {
                        // Never finalised, the upload leaves no object behind.
                        self.cancel(&session).await;
                        return Err(StoreError::backend(format!("receiving data for {key}"), e));
                    }
                };
            }
            let len = if eof { buf.len() } else { CHUNK };
            let total = eof.then(|| offset + buf.len() as u64);
            let body = Bytes::copy_from_slice(&buf[..len]);
            match self
                .send_chunk_retrying(Chunk {
                    session: &session,
                    body,
                    offset,
                    total,
                    content_type,
                })
                .await
            {
                Ok(None) if eof => return Ok(offset + buf.len() as u64),
                Ok(None) => {
                    return Err(self.classify(
                        "writing",
                        &self.url_of(key),
                        GcsError::Protocol("the upload completed before its last chunk".into()),
                    ))
                }
                Ok(Some(held))
                    if (held > offset && held <= offset + len as u64)
                        || (held == offset && stalls + 1 < ATTEMPTS) =>
                {
                    stalls = if held == offset { stalls + 1 } else { 0 };
                    buf.advance((held - offset) as usize);
                    offset = held;
                }
                Ok(Some(held)) => {
                    self.cancel(&session).await;
                    return Err(self.classify(
                        "writing",
                        &self.url_of(key),
                        GcsError::Protocol(format!(
                            "GCS holds {held} bytes after a chunk at {offset}+{len}"
                        )),
                    ));
                }
                Err(e) => {
                    self.cancel(&session).await;
                    return Err(self.fail("writing", key, e).await);
                }
            }
        }
    }
}

/// Reads from `data` until `buf` holds `want` bytes; true when the stream ended first.
pub(super) async fn fill(
    buf: &mut BytesMut,
    data: &mut ByteStream,
    want: usize,
) -> io::Result<bool> {
    while buf.len() < want {
        match data.next().await {
            Some(chunk) => buf.extend_from_slice(&chunk?),
            None => return Ok(true),
        }
    }
    Ok(false)
}

/// Reads a resumable upload's answer: 308 with how much GCS holds, or 200/201 when done.
async fn upload_progress(resp: Response) -> Result<Option<u64>, GcsError> {
    match resp.status() {
        StatusCode::OK | StatusCode::CREATED => Ok(None),
        StatusCode::PERMANENT_REDIRECT => Ok(Some(held_bytes(resp.headers().get(RANGE))?)),
        _ => Err(GcsError::from_response(resp).await),
    }
}

/// The `Range: bytes=0-N` header of a 308: N + 1 bytes held; none without the header.
fn held_bytes(range: Option<&HeaderValue>) -> Result<u64, GcsError> {
    let Some(v) = range else { return Ok(0) };
    v.to_str()
        .ok()
        .and_then(|s| s.strip_prefix("bytes=0-"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .and_then(|last| last.checked_add(1))
        .ok_or_else(|| GcsError::Protocol(format!("upload progress {v:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_progress_header() {
        let held = HeaderValue::from_static("bytes=0-262143");
        assert_eq!(held_bytes(Some(&held)).unwrap(), 262144);
        assert_eq!(held_bytes(None).unwrap(), 0);
        assert!(held_bytes(Some(&HeaderValue::from_static("bytes=5-9"))).is_err());
        let huge = HeaderValue::from_static("bytes=0-18446744073709551615");
        assert!(
            held_bytes(Some(&huge)).is_err(),
            "an overflowing count is refused"
        );
    }
}
