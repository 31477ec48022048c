//! `gs://BUCKET`: objects in a Google Cloud Storage bucket, through GCS's JSON API.
//!
//! A thin client of our own on `reqwest`: the crates that speak GCS either write through the
//! XML API, which the fake-gcs-server emulator lacks (`object_store`), or cost minutes of
//! build and a gRPC stack for what is five HTTP calls (`google-cloud-storage`). Tokens come
//! from Google Application Default Credentials through `gcp_auth`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderValue, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::OnceCell;

use super::blobs::{check_key, Blobs};
use super::{slice_stream, Blob, ByteRange, ByteStream, Result, StoreError};

/// Google's endpoint, when no other is given.
const GOOGLE: &str = "https://storage.googleapis.com";

/// The OAuth scope for reading and writing objects.
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// Objects up to this size go up in one request; bigger ones as a resumable upload in chunks
/// of this size (GCS wants multiples of 256 KiB). Memory per upload is about two chunks.
const CHUNK: usize = 8 * 1024 * 1024;

/// Attempts for one request when GCS or the network fails transiently.
const ATTEMPTS: u32 = 5;

/// Characters left as they are in a path segment; GCS wants everything else encoded,
/// including `/` inside object names.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Where a GCS bucket is, as a store URL says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcsOptions {
    /// The bucket name.
    pub bucket: String,
    /// Key prefix every object lives under, without leading or trailing `/` (empty: the root).
    pub prefix: String,
    /// The `endpoint=` parameter as written: a URL, or `host:port` for plain HTTP.
    pub endpoint: Option<String>,
}

impl GcsOptions {
    /// `gs://bucket/prefix`, for logs and messages.
    pub fn describe(&self) -> String {
        let mut s = format!("gs://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(ep) = &self.endpoint {
            s.push_str(&format!(" (endpoint {ep})"));
        }
        s
    }
}

/// Where requests go, and whether they carry Google credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]`, no trailing slash.
    pub base: String,
    /// Send OAuth tokens. Emulators get none, and neither does plain HTTP, which would leak
    /// them.
    pub authenticated: bool,
}

impl Endpoint {
    /// Picks the endpoint from the URL's `endpoint=` and the `STORAGE_EMULATOR_HOST`
    /// environment variable (the convention of Google's own client libraries), in that order.
    pub fn resolve(param: Option<&str>, emulator_host: Option<&str>) -> Result<Endpoint> {
        let (raw, emulator) = match (param, emulator_host.filter(|h| !h.is_empty())) {
            (Some(p), _) => (p, false),
            (None, Some(e)) => (e, true),
            (None, None) => {
                return Ok(Endpoint {
                    base: GOOGLE.into(),
                    authenticated: true,
                })
            }
        };
        let with_scheme = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}")
        };
        let url = url::Url::parse(&with_scheme)
            .map_err(|e| StoreError::Invalid(format!("GCS endpoint {raw:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || url.query().is_some()
            || !matches!(url.path(), "" | "/")
        {
            return Err(StoreError::Invalid(format!(
                "GCS endpoint {raw:?} must be http(s)://host[:port] or host:port"
            )));
        }
        Ok(Endpoint {
            base: with_scheme.trim_end_matches('/').to_owned(),
            authenticated: !emulator && url.scheme() == "https",
        })
    }
}

/// What went wrong on the wire, before it is put in a user's terms.
#[derive(Debug, Error)]
enum GcsError {
    #[error("GCS answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("{}", chain(.0))]
    Http(#[source] reqwest::Error),
    #[error("getting a Google access token: {}", chain(.0))]
    Token(#[source] gcp_auth::Error),
    #[error("unusable Google credentials: {0}")]
    Credentials(String),
    #[error("unexpected answer from GCS: {0}")]
    Protocol(String),
}

impl GcsError {
    fn status(&self) -> Option<StatusCode> {
        match self {
            GcsError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth trying again: the network, throttling, or GCS's own trouble.
    fn is_transient(&self) -> bool {
        match self {
            GcsError::Status { status, .. } => transient_status(*status),
            GcsError::Http(e) => e.is_connect() || e.is_timeout() || e.is_request(),
            _ => false,
        }
    }

    async fn from_response(resp: Response) -> GcsError {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        #[derive(Deserialize)]
        struct Body {
            error: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            message: String,
        }
        let message = match serde_json::from_str::<Body>(&body) {
            Ok(b) => b.error.message,
            Err(_) => body.chars().take(300).collect::<String>().trim().to_owned(),
        };
        GcsError::Status { status, message }
    }
}

fn transient_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT
}

/// An error and its causes on one line; reqwest keeps the useful part ("connection
/// refused") in its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

/// Tokens for requests, found on first use (finding them can mean asking a metadata server).
enum Auth {
    /// Emulators and plain HTTP.
    None,
    /// Application Default Credentials, found on first use: `Ok(None)` when there are none
    /// (anonymous), `Err` when `GOOGLE_APPLICATION_CREDENTIALS` names a file that does not work.
    Adc(OnceCell<Result<Option<Arc<dyn gcp_auth::TokenProvider>>, String>>),
}

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
            .read_timeout(Duration::from_secs(60))
            // Resumable uploads answer 308, which is not a redirect to follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StoreError::backend("setting up the HTTP client for GCS", e))?;
        let auth = if endpoint.authenticated {
            Auth::Adc(OnceCell::new())
        } else {
            Auth::None
        };
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

    fn bucket_url(&self) -> String {
        format!(
            "{}/storage/v1/b/{}/o",
            self.endpoint.base,
            utf8_percent_encode(&self.options.bucket, SEGMENT)
        )
    }

    /// The bucket's object listing with query parameters, encoded.
    fn list_url(&self, query: &[(&str, &str)]) -> String {
        let mut url = url::Url::parse(&self.bucket_url()).expect("the endpoint was validated");
        url.query_pairs_mut().extend_pairs(query);
        url.into()
    }

    fn object_url(&self, name: &str) -> String {
        format!(
            "{}/{}",
            self.bucket_url(),
            utf8_percent_encode(name, SEGMENT)
        )
    }

    fn upload_url(&self, kind: &str, name: &str) -> String {
        let mut url = url::Url::parse(&format!(
            "{}/upload/storage/v1/b/{}/o",
            self.endpoint.base,
            utf8_percent_encode(&self.options.bucket, SEGMENT)
        ))
        .expect("the endpoint was validated");
        url.query_pairs_mut()
            .append_pair("uploadType", kind)
            .append_pair("name", name);
        url.into()
    }

    async fn authorize(&self, rb: RequestBuilder) -> Result<RequestBuilder, GcsError> {
        let Auth::Adc(cell) = &self.auth else {
            return Ok(rb);
        };
        let provider = cell
            .get_or_init(|| async {
                let explicit = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS");
                match tokio::time::timeout(Duration::from_secs(30), gcp_auth::provider()).await {
                    Ok(Ok(p)) => Ok(Some(p)),
                    // A key file the user pointed at must work: quietly going anonymous
                    // would turn a typo into "access denied" much later.
                    Ok(Err(e)) if explicit.is_some() => Err(format!(
                        "GOOGLE_APPLICATION_CREDENTIALS={}: {}",
                        explicit.unwrap_or_default().to_string_lossy(),
                        chain(&e)
                    )),
                    Ok(Err(e)) => {
                        tracing::info!(
                            "no Google credentials found ({}); using anonymous access to gs://{}, which works only for public buckets",
                            chain(&e),
                            self.options.bucket
                        );
                        Ok(None)
                    }
                    Err(_) => {
                        tracing::info!(
                            "looking for Google credentials timed out; using anonymous access to gs://{}, which works only for public buckets",
                            self.options.bucket
                        );
                        Ok(None)
                    }
                }
            })
            .await;
        match provider {
            Err(msg) => Err(GcsError::Credentials(msg.clone())),
            Ok(None) => Ok(rb),
            Ok(Some(p)) => {
                let token = p.token(&[SCOPE]).await.map_err(GcsError::Token)?;
                Ok(rb.bearer_auth(token.as_str()))
            }
        }
    }

    /// Sends a request (rebuilt by `make` for each attempt), retrying transient failures;
    /// any answer other than 2xx or 308 becomes an error.
    async fn send(&self, make: impl Fn() -> RequestBuilder) -> Result<Response, GcsError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.authorize(make()).await?.send().await {
                Ok(resp)
                    if resp.status().is_success()
                        || resp.status() == StatusCode::PERMANENT_REDIRECT =>
                {
                    return Ok(resp)
                }
                Ok(resp) => GcsError::from_response(resp).await,
                Err(e) => GcsError::Http(e),
            };
            if attempt >= ATTEMPTS || !err.is_transient() {
                return Err(err);
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Whether the bucket exists: `Some(false)` only when GCS said so.
    async fn bucket_exists(&self, probe: &str) -> Option<bool> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Some(true);
        }
        let url = self.list_url(&[("prefix", probe), ("maxResults", "1")]);
        let r = self.send(|| self.http.get(&url)).await;
        match r {
            Ok(_) => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Some(true)
            }
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Some(false),
            Err(_) => None,
        }
    }

    /// Puts a wire error in terms a user can act on.
    async fn fail(&self, doing: &str, key: &str, e: GcsError) -> StoreError {
        if e.status() == Some(StatusCode::NOT_FOUND) {
            if self.bucket_exists(&self.full_name(key)).await == Some(false) {
                return self.no_bucket(e);
            }
            return StoreError::NotFound(key.into());
        }
        self.classify(doing, &self.url_of(key), e)
    }

    fn no_bucket(&self, e: GcsError) -> StoreError {
        StoreError::backend(
            format!(
                "GCS bucket {:?} does not exist at {} (create it, or check the gs:// URL)",
                self.options.bucket, self.endpoint.base
            ),
            e,
        )
    }

    fn classify(&self, doing: &str, what: &str, e: GcsError) -> StoreError {
        let anonymous = match &self.auth {
            Auth::Adc(cell) => matches!(cell.get(), Some(Ok(None))),
            Auth::None => false,
        };
        let why = match &e {
            GcsError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                Some("GCS refused the credentials".to_owned())
            }
            GcsError::Status { status, .. } if *status == StatusCode::FORBIDDEN && anonymous => {
                Some("GCS denied anonymous access; no Google credentials were found (set GOOGLE_APPLICATION_CREDENTIALS or run on GCP)".to_owned())
            }
            GcsError::Status { status, .. } if *status == StatusCode::FORBIDDEN => Some(
                "GCS denied access (the credentials lack permission on this bucket)".to_owned(),
            ),
            GcsError::Http(h) if h.is_connect() || h.is_timeout() => Some(format!(
                "cannot reach the GCS endpoint {}",
                self.endpoint.base
            )),
            GcsError::Token(_) | GcsError::Credentials(_) => {
                Some("Google credentials were found but do not work".into())
            }
            _ => None,
        };
        match why {
            Some(why) => StoreError::backend(format!("{doing} {what}: {why}"), e),
            None => StoreError::backend(format!("{doing} {what}"), e),
        }
    }

    /// The error for a range that selects nothing, which needs the object's size.
    async fn unsatisfiable(&self, key: &str, range: ByteRange) -> StoreError {
        match self.head(key).await {
            Ok(Some(total)) if range.resolve(total).is_none() => {
                StoreError::RangeNotSatisfiable { total }
            }
            Ok(Some(_)) => StoreError::Invalid(format!("byte range {range:?} of {key}")),
            Ok(None) => StoreError::NotFound(key.into()),
            Err(e) => e,
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

    /// Sends bytes `[offset, offset + len)` of an upload (`total` on the last chunk); returns
    /// how many bytes GCS now holds, or `None` once the object is complete.
    async fn send_chunk(
        &self,
        session: &str,
        body: Bytes,
        offset: u64,
        total: Option<u64>,
        content_type: &str,
    ) -> Result<Option<u64>, GcsError> {
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
        let resp = self
            .authorize(
                self.http
                    .put(session)
                    .header(CONTENT_RANGE, range)
                    .header(CONTENT_TYPE, content_type)
                    .body(body),
            )
            .await?
            .send()
            .await
            .map_err(GcsError::Http)?;
        upload_progress(resp).await
    }

    /// Asks how much of an upload GCS holds, after a chunk failed midway.
    async fn upload_status(&self, session: &str) -> Result<Option<u64>, GcsError> {
        let resp = self
            .authorize(
                self.http
                    .put(session)
                    .header(CONTENT_RANGE, "bytes */*")
                    .body(Bytes::new()),
            )
            .await?
            .send()
            .await
            .map_err(GcsError::Http)?;
        upload_progress(resp).await
    }

    /// One chunk, retried through transient failures by asking GCS where it got to.
    async fn send_chunk_retrying(
        &self,
        session: &str,
        body: Bytes,
        offset: u64,
        total: Option<u64>,
        content_type: &str,
    ) -> Result<Option<u64>, GcsError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .send_chunk(session, body.clone(), offset, total, content_type)
                .await
            {
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                    match self.upload_status(session).await {
                        Ok(Some(held)) if held > offset => return Ok(Some(held)),
                        Ok(None) => return Ok(None),
                        _ => continue,
                    }
                }
                other => return other,
            }
        }
    }

    async fn cancel(&self, session: &str) {
        if let Ok(rb) = self.authorize(self.http.delete(session)).await {
            let _ = rb.send().await;
        }
    }

    /// Streams `data` up as a resumable upload, holding at most about two chunks.
    async fn resumable(
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
                .send_chunk_retrying(&session, body, offset, total, content_type)
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
async fn fill(buf: &mut BytesMut, data: &mut ByteStream, want: usize) -> io::Result<bool> {
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
        .map(|last| last + 1)
        .ok_or_else(|| GcsError::Protocol(format!("upload progress {v:?}")))
}

/// `Content-Range: bytes a-b/total` → `(a, b + 1, total)`.
fn content_range(v: Option<&HeaderValue>) -> Option<(u64, u64, u64)> {
    let s = v?.to_str().ok()?.strip_prefix("bytes ")?;
    let (span, total) = s.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((
        a.parse().ok()?,
        b.parse::<u64>().ok()? + 1,
        total.parse().ok()?,
    ))
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

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 << attempt.min(6))
}

#[async_trait]
impl Blobs for GcsBlobs {
    fn describe(&self) -> String {
        self.options.describe()
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        let name = self.name_of(key)?;
        let header = match range {
            None => None,
            Some(r) => match range_header(r) {
                Some(h) => Some(h),
                None => return Err(self.unsatisfiable(key, r).await),
            },
        };
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
                    StoreError::backend(
                        format!("reading {}", self.url_of(key)),
                        GcsError::Protocol(
                            "a partial answer without a usable Content-Range".into(),
                        ),
                    )
                })?;
            let stream = resp.bytes_stream().map_err(io::Error::other);
            return Ok(Blob {
                stream: Box::pin(stream),
                span: (start, end),
                total,
            });
        }
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

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
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
            keys.extend(
                listing
                    .items
                    .into_iter()
                    .filter_map(|o| o.name.strip_prefix(&own).map(str::to_owned)),
            );
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
    fn endpoints() {
        let google = Endpoint::resolve(None, None).unwrap();
        assert_eq!(google.base, GOOGLE);
        assert!(google.authenticated);
        let emu = Endpoint::resolve(None, Some("localhost:4443")).unwrap();
        assert_eq!(emu.base, "http://localhost:4443");
        assert!(!emu.authenticated);
        let emu = Endpoint::resolve(None, Some("https://emu:4443/")).unwrap();
        assert_eq!(emu.base, "https://emu:4443");
        assert!(!emu.authenticated, "an emulator never gets tokens");
        let param = Endpoint::resolve(Some("http://127.0.0.1:9"), Some("other:1")).unwrap();
        assert_eq!(param.base, "http://127.0.0.1:9", "the URL wins");
        assert!(!param.authenticated);
        let private = Endpoint::resolve(Some("https://storage.example.com"), None).unwrap();
        assert!(private.authenticated);
        assert!(Endpoint::resolve(Some("ftp://x"), None).is_err());
        assert!(Endpoint::resolve(Some("http://x/path"), None).is_err());
        assert!(Endpoint::resolve(Some("http://"), None).is_err());
    }

    #[test]
    fn errors_name_their_cause() {
        let b = GcsBlobs::open(&GcsOptions {
            bucket: "b".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            ..GcsOptions::default()
        })
        .unwrap();
        let status = |code: u16| GcsError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            message: "no".into(),
        };
        let e = b.classify("reading", "gs://b/k", status(401)).to_string();
        assert!(e.contains("GCS refused the credentials"), "{e}");
        let e = b.classify("reading", "gs://b/k", status(403)).to_string();
        assert!(e.contains("GCS denied access"), "{e}");
        let e = b.classify("reading", "gs://b/k", status(500)).to_string();
        assert!(e.starts_with("reading gs://b/k: GCS answered 500"), "{e}");
        assert!(status(503).is_transient() && status(429).is_transient());
        assert!(!status(404).is_transient());
    }

    #[test]
    fn wire_formats() {
        assert_eq!(
            utf8_percent_encode("nar/a+b=c~d.nar", SEGMENT).to_string(),
            "nar%2Fa%2Bb%3Dc~d.nar"
        );
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
        let held = HeaderValue::from_static("bytes=0-262143");
        assert_eq!(held_bytes(Some(&held)).unwrap(), 262144);
        assert_eq!(held_bytes(None).unwrap(), 0);
        assert!(held_bytes(Some(&HeaderValue::from_static("bytes=5-9"))).is_err());
    }
}
