//! `gs://BUCKET`: objects in a Google Cloud Storage bucket, through GCS's JSON API.
//!
//! A thin client of our own on `reqwest`: the crates that speak GCS either write through the
//! XML API, which the fake-gcs-server emulator lacks (`object_store`), or cost minutes of
//! build and a gRPC stack for what is five HTTP calls (`google-cloud-storage`). Tokens come
//! from Google Application Default Credentials through `gcp_auth`.
//!
//! This file holds the client and its [`Blobs`] operations; beside it are where requests go
//! (`endpoint`), credentials (`auth`), errors and their meaning (`error`), retries (`retry`)
//! and resumable uploads (`resumable`).

mod auth;
mod endpoint;
mod error;
mod resumable;
mod retry;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use reqwest::header::{HeaderValue, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;

pub use endpoint::{Endpoint, GcsOptions};

use super::blobs::{check_key, translate_range, Blobs, ObjectMeta, DEFAULT_STALL_TIMEOUT};
use super::{slice_stream, Blob, ByteRange, ByteStream, Result, StoreError};
use auth::Auth;
use error::GcsError;
use resumable::{fill, CHUNK};
use retry::retry;

/// Objects in a GCS bucket.
pub struct GcsBlobs {
    http: reqwest::Client,
    endpoint: Endpoint,
    options: GcsOptions,
    auth: Auth,
    /// Set once a listing proved the bucket exists: GCS answers a missing object and a
    /// missing bucket with the same 404, so a miss is only trusted after that.
    bucket_seen: AtomicBool,
}

impl std::fmt::Debug for GcsBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsBlobs")
            .field("endpoint", &self.endpoint)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ObjectResource {
    size: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listing {
    #[serde(default)]
    items: Vec<Named>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
    /// Decimal, as the JSON API writes 64-bit numbers.
    #[serde(default)]
    size: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    updated: Option<String>,
}

impl GcsBlobs {
    /// Prepares a client for the bucket; nothing is sent until the first request.
    pub fn open(options: &GcsOptions) -> Result<GcsBlobs> {
        let emulator = std::env::var("STORAGE_EMULATOR_HOST").ok();
        let endpoint = Endpoint::resolve(options.endpoint.as_deref(), emulator.as_deref())?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("nixcached/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // A NAR of gigabytes takes as long as it takes; only a stalled connection fails.
            .read_timeout(options.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT))
            // Resumable uploads answer 308, which is not a redirect to follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StoreError::backend("setting up the HTTP client for GCS", e))?;
        let auth = Auth::for_endpoint(&endpoint);
        Ok(GcsBlobs {
            http,
            endpoint,
            options: options.clone(),
            auth,
            bucket_seen: AtomicBool::new(false),
        })
    }

    fn name_of(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(self.full_name(key))
    }

    fn full_name(&self, key: &str) -> String {
        match self.options.prefix.as_str() {
            "" => key.to_owned(),
            p => format!("{p}/{key}"),
        }
    }

    fn url_of(&self, key: &str) -> String {
        format!("gs://{}/{}", self.options.bucket, self.full_name(key))
    }

    /// Sends a request (rebuilt by `make` for each attempt), retrying transient failures;
    /// any answer other than 2xx or 308 becomes an error.
    async fn send(&self, make: impl Fn() -> RequestBuilder) -> Result<Response, GcsError> {
        retry(|| self.send_once(make())).await
    }

    /// One attempt of a request: any answer other than 2xx or 308 becomes an error.
    async fn send_once(&self, rb: RequestBuilder) -> Result<Response, GcsError> {
        let resp = self
            .auth
            .authorize(rb, &self.options.bucket)
            .await?
            .send()
            .await
            .map_err(GcsError::Http)?;
        if resp.status().is_success() || resp.status() == StatusCode::PERMANENT_REDIRECT {
            Ok(resp)
        } else {
            Err(GcsError::from_response(resp).await)
        }
    }

    async fn simple_upload(
        &self,
        name: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<(), GcsError> {
        let url = self.upload_url("media", name);
        self.send(|| {
            self.http
                .post(&url)
                .header(CONTENT_TYPE, content_type)
                .body(body.clone())
        })
        .await
        .map(drop)
    }
}

/// The HTTP `Range` for a byte range; `None` when it cannot select anything.
fn range_header(range: ByteRange) -> Option<String> {
    match range {
        ByteRange::Span { start, end: None } => Some(format!("bytes={start}-")),
        ByteRange::Span {
            start,
            end: Some(end),
        } => (end > start).then(|| format!("bytes={start}-{}", end - 1)),
        ByteRange::Last(0) => None,
        ByteRange::Last(n) => Some(format!("bytes=-{n}")),
    }
}

/// `Content-Range: bytes a-b/total` → `(a, b + 1, total)`; `None` unless it describes a
/// slice of the object, as readers of the blob subtract its ends.
fn content_range(v: Option<&HeaderValue>) -> Option<(u64, u64, u64)> {
    let s = v?.to_str().ok()?.strip_prefix("bytes ")?;
    let (span, total) = s.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (start, end, total): (u64, u64, u64) = (
        a.parse().ok()?,
        b.parse::<u64>().ok()?.checked_add(1)?,
        total.parse().ok()?,
    );
    (start < end && end <= total).then_some((start, end, total))
}

#[async_trait]
impl Blobs for GcsBlobs {
    fn describe(&self) -> String {
        self.options.describe()
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        let name = self.name_of(key)?;
        let header = translate_range(self, key, range, range_header).await?;
        let url = format!("{}?alt=media", self.object_url(&name));
        let resp = self
            .send(|| {
                let rb = self.http.get(&url);
                match &header {
                    Some(h) => rb.header(RANGE, h),
                    None => rb,
                }
            })
            .await;
        let resp = match (resp, range) {
            (Ok(r), _) => r,
            (Err(e), Some(r)) if e.status() == Some(StatusCode::RANGE_NOT_SATISFIABLE) => {
                return Err(self.unsatisfiable(key, r).await)
            }
            (Err(e), _) => return Err(self.fail("reading", key, e).await),
        };
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            let (start, end, total) =
                content_range(resp.headers().get(CONTENT_RANGE)).ok_or_else(|| {
                    self.classify(
                        "reading",
                        &self.url_of(key),
                        GcsError::Protocol(
                            "a partial answer without a usable Content-Range".into(),
                        ),
                    )
                })?;
            let stream = resp.bytes_stream().map_err(io::Error::other);
            return Ok(Blob {
                stream: Box::pin(stream),
                span: (start, end),
                encoding: None,
                total,
            });
        }
        let encoding = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .and_then(super::encoded::from_header);
        let total = match resp.content_length() {
            Some(n) => n,
            None => match self.head(key).await? {
                Some(n) => n,
                None => return Err(StoreError::NotFound(key.into())),
            },
        };
        let stream: ByteStream = Box::pin(resp.bytes_stream().map_err(io::Error::other));
        // A server that ignored the Range header sent everything: cut the slice out here.
        let (start, end) = ByteRange::resolve_or_err(range, total)?;
        let stream = if (start, end) == (0, total) {
            stream
        } else {
            slice_stream(stream, start, end)
        };
        Ok(Blob {
            stream,
            span: (start, end),
            encoding,
            total,
        })
    }

    async fn put(&self, key: &str, mut data: ByteStream, content_type: &str) -> Result<u64> {
        let name = self.name_of(key)?;
        let mut buf = BytesMut::new();
        let eof = fill(&mut buf, &mut data, CHUNK + 1)
            .await
            .map_err(|e| StoreError::backend(format!("receiving data for {key}"), e))?;
        if !eof {
            return self
                .resumable(key, &name, buf, &mut data, content_type)
                .await;
        }
        let n = buf.len() as u64;
        match self.simple_upload(&name, buf.freeze(), content_type).await {
            Ok(()) => Ok(n),
            Err(e) => Err(self.fail("writing", key, e).await),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let name = self.name_of(key)?;
        let url = self.object_url(&name);
        match self.send(|| self.http.delete(&url)).await {
            Ok(_) => Ok(()),
            Err(e) => match self.fail("removing", key, e).await {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let name = self.name_of(key)?;
        let url = self.object_url(&name);
        let resp = match self.send(|| self.http.get(&url)).await {
            Ok(r) => r,
            Err(e) => {
                return match self.fail("checking", key, e).await {
                    StoreError::NotFound(_) => Ok(None),
                    other => Err(other),
                }
            }
        };
        let what = self.url_of(key);
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.classify("checking", &what, GcsError::Http(e)))?;
        let meta: ObjectResource = serde_json::from_slice(&body)
            .map_err(|e| self.classify("checking", &what, GcsError::Protocol(e.to_string())))?;
        meta.size.parse().map(Some).map_err(|_| {
            self.classify(
                "checking",
                &what,
                GcsError::Protocol(format!("object size {:?}", meta.size)),
            )
        })
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let rel = prefix.trim_end_matches('/');
        if !rel.is_empty() {
            check_key(rel)?;
        }
        let own = match self.options.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let full = format!("{own}{prefix}");
        let what = format!("gs://{}/{full}", self.options.bucket);
        let mut keys = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut query = vec![("prefix", full.as_str()), ("delimiter", "/")];
            if let Some(token) = &page {
                query.push(("pageToken", token));
            }
            let url = self.list_url(&query);
            let resp = self.send(|| self.http.get(&url)).await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                    return Err(self.no_bucket(e))
                }
                Err(e) => return Err(self.classify("listing", &what, e)),
            };
            self.bucket_seen.store(true, Ordering::Relaxed);
            let body = resp
                .bytes()
                .await
                .map_err(|e| self.classify("listing", &what, GcsError::Http(e)))?;
            let listing: Listing = serde_json::from_slice(&body)
                .map_err(|e| self.classify("listing", &what, GcsError::Protocol(e.to_string())))?;
            for o in listing.items {
                let Some(key) = o.name.strip_prefix(&own) else {
                    continue;
                };
                let size = o
                    .size
                    .as_deref()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        self.classify(
                            "listing",
                            &what,
                            GcsError::Protocol(format!("object {key:?} without a size")),
                        )
                    })?;
                keys.push(ObjectMeta {
                    key: key.to_owned(),
                    size,
                    modified: o
                        .updated
                        .as_deref()
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
                });
            }
            match listing.next_page_token {
                Some(t) if !t.is_empty() => page = Some(t),
                _ => return Ok(keys),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_headers() {
        assert_eq!(
            range_header(ByteRange::span(2, Some(6))).as_deref(),
            Some("bytes=2-5")
        );
        assert_eq!(
            range_header(ByteRange::span(2, None)).as_deref(),
            Some("bytes=2-")
        );
        assert_eq!(
            range_header(ByteRange::Last(3)).as_deref(),
            Some("bytes=-3")
        );
        assert_eq!(range_header(ByteRange::Last(0)), None);
        assert_eq!(range_header(ByteRange::span(4, Some(4))), None);
        let cr = HeaderValue::from_static("bytes 2-5/22");
        assert_eq!(content_range(Some(&cr)), Some((2, 6, 22)));
        assert_eq!(content_range(None), None);
        for bad in [
            "bytes 0-18446744073709551615/1",
            "bytes 5-2/22",
            "bytes 2-30/22",
        ] {
            let v = HeaderValue::from_static(bad);
            assert_eq!(content_range(Some(&v)), None, "{bad}");
        }
    }
}
