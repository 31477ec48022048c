//! Stores: where narinfos and NARs come from and go to.
//!
//! [`Store`] is the one interface every backend implements: the local Nix store
//! ([`local::LocalStore`]), and binary caches ([`binary_cache::BinaryCache`]) over any
//! [`blobs::Blobs`] backend such as a folder ([`file::FileBlobs`]), upstream HTTP caches
//! ([`upstream::UpstreamStore`]), and one store in front of another ([`layered::LayeredStore`]).
//! A served store sits behind [`guarded::GuardedStore`], which watches it for outages.
//! [`url::StoreUrl`] turns the URLs users type into one of them.

pub mod binary_cache;
pub mod blobs;
pub mod encoded;
pub mod file;
pub mod gcs;
pub mod guarded;
pub mod layered;
pub mod local;
pub mod memory;
pub mod nix_object;
pub mod realisation;
pub mod s3;
pub mod ssh;
pub mod upstream;
pub mod url;

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use thiserror::Error;

use crate::formats::{CacheInfo, Digest, NarInfo};

/// Largest build log served, in bytes (decompressed).
///
/// Logs are streamed or spooled to a temporary file, never held in memory, so this bounds
/// the disk one request can take: a build can print without limit and Nix stores its log as
/// bzip2, which shrinks gigabytes of repeated output to kilobytes. Real logs stay far below
/// 1 GiB (the largest, of browser builds, are some hundreds of MiB).
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// Bytes that arrive in chunks; NARs of any size travel like this, never as one buffer.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// A byte range, as in an HTTP `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// From `start` to one before `end` (`None`: to the end), as in `bytes=0-99` or `bytes=100-`.
    Span {
        /// First byte.
        start: u64,
        /// One past the last byte; `None` for "to the end".
        end: Option<u64>,
    },
    /// The last `n` bytes, as in `bytes=-500`.
    Last(u64),
}

impl ByteRange {
    /// `[start, end)`; `None` for "to the end".
    pub fn span(start: u64, end: Option<u64>) -> ByteRange {
        ByteRange::Span { start, end }
    }

    /// Clamps the range to an object of `size` bytes; `None` when it selects nothing.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::Span { start, end } => {
                let end = end.unwrap_or(size).min(size);
                (start < end).then_some((start, end))
            }
            ByteRange::Last(n) => (n > 0 && size > 0).then(|| (size.saturating_sub(n), size)),
        }
    }

    /// Resolves against `size`, or the error a client gets for an unsatisfiable range.
    pub fn resolve_or_err(range: Option<ByteRange>, size: u64) -> Result<(u64, u64)> {
        match range {
            None => Ok((0, size)),
            Some(r) => r
                .resolve(size)
                .ok_or(StoreError::RangeNotSatisfiable { total: size }),
        }
    }
}

/// An object's bytes, possibly a slice of it.
pub struct Blob {
    /// The bytes of the requested range (or of the whole object).
    pub stream: ByteStream,
    /// Where the slice starts and ends in the object; `(0, total)` without a range.
    pub span: (u64, u64),
    /// The object's whole size.
    pub total: u64,
    /// The `Content-Encoding` the object was stored with, when the backend reports one (an
    /// S3 object's metadata, an upstream's header): Nix's `narinfo-compression`,
    /// `ls-compression` and `log-compression` store those objects compressed that way. The
    /// bytes are as stored; [`encoded`] reads them.
    pub encoding: Option<crate::formats::Compression>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("span", &self.span)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Blob {
    /// A blob of the `span` of an object of `total` bytes, from a stream of the whole object
    /// (which is cut to the span; dropping the rest stops its producer).
    pub fn of_span(stream: ByteStream, span: (u64, u64), total: u64) -> Blob {
        let stream = if span == (0, total) {
            stream
        } else {
            slice_stream(stream, span.0, span.1)
        };
        Blob {
            stream,
            span,
            encoding: None,
            total,
        }
    }

    /// Reads a small object (narinfo, listing, nix-cache-info) whole, refusing one longer
    /// than `max` bytes as [`StoreError::Corrupt`]: by its announced size before reading,
    /// and as it arrives, so a hostile object costs at most `max` bytes of memory.
    pub async fn into_bytes_capped(mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let too_large = || {
            StoreError::Corrupt(format!(
                "{what} is larger than the {max} bytes a real one ever takes; the store holds a corrupt or hostile object, remove or replace it"
            ))
        };
        if self.span.1.saturating_sub(self.span.0) > max as u64 {
            return Err(too_large());
        }
        let mut out = Vec::new();
        while let Some(chunk) = self.stream.next().await {
            let chunk = chunk.map_err(|e| StoreError::backend(format!("reading {what}"), e))?;
            if out.len() + chunk.len() > max {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Reads the whole blob into memory, however large; for tests and objects already
    /// known to be small.
    pub async fn into_bytes(mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = self.stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }
}

/// What can go wrong talking to a store, in terms a user can act on.
///
/// Cloneable (the cause is shared), so one failed lookup can be handed to every caller that
/// waited on it; [`StoreError::is_transient`] is the one rule for whether trying again can help:
/// the explorer answers 503 or 502 by it, and the uploader says whether the destination needs
/// fixing (it retries both, since a journaled path loses nothing by waiting). Upstream failures get their flag from
/// [`upstream::UpstreamError::is_transient`], the same rule that counts them against an
/// upstream's health, so the two cannot disagree.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The object does not exist (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request itself is malformed (bad hash, path traversal): the caller's fault.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The store cannot do this (for example writing into the local Nix store).
    #[error("{0}")]
    Unsupported(String),
    /// The requested byte range selects nothing of an object of `total` bytes (HTTP 416).
    #[error("requested range is outside the object's {total} bytes")]
    RangeNotSatisfiable {
        /// The object's size.
        total: u64,
    },
    /// The store holds data that does not parse.
    #[error("corrupt data in the store: {0}")]
    Corrupt(String),
    /// The store is known to be down (its last probe failed), so it was not asked; it is
    /// probed in the background and asked again once it answers.
    #[error("{0}; it is checked again every few seconds and used again once it answers")]
    Unavailable(String),
    /// The backend failed (I/O, network, database).
    #[error("{context}: {source}")]
    Backend {
        /// What was being done.
        context: String,
        /// The cause, shared between clones.
        source: Arc<dyn std::error::Error + Send + Sync>,
        /// True when the same request may succeed later (a timeout, a 5xx, a reset); false
        /// when only a change of configuration helps (access denied, no such bucket).
        transient: bool,
    },
}

impl StoreError {
    /// Wraps a backend error that may go away by itself (network, I/O, 5xx).
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::backend_flagged(context, source, true)
    }

    /// Wraps a backend error that retrying cannot fix (refused credentials, a missing bucket).
    pub fn backend_permanent(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::backend_flagged(context, source, false)
    }

    /// Wraps a backend error whose transience a backend's own classification decided.
    pub fn backend_flagged(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
        transient: bool,
    ) -> Self {
        StoreError::Backend {
            context: context.into(),
            source: Arc::from(source.into()),
            transient,
        }
    }

    /// True for [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }

    /// True when trying the same operation again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Backend { transient, .. } => *transient,
            StoreError::Unavailable(_) => true,
            StoreError::NotFound(_)
            | StoreError::Invalid(_)
            | StoreError::Unsupported(_)
            | StoreError::RangeNotSatisfiable { .. }
            | StoreError::Corrupt(_) => false,
        }
    }
}

/// A value from a store, and whether this server vouches for it (see
/// [`Store::narinfo_vouched`]).
#[derive(Debug, Clone)]
pub struct Vouched<T> {
    /// The value.
    pub value: T,
    /// True when this server may sign it.
    pub vouched: bool,
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One interface over every kind of store.
///
/// Reads are what `serve` needs; writes are what `upload` needs. A store that cannot be
/// written answers writes with [`StoreError::Unsupported`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for logs (the store URL without secrets).
    fn describe(&self) -> String;

    /// The cache's `nix-cache-info`.
    async fn cache_info(&self) -> Result<CacheInfo>;

    /// The narinfo of the store object with this 32-character digest.
    async fn narinfo(&self, digest: &Digest) -> Result<NarInfo>;

    /// The narinfo, and whether this server may add its own signature to it. A store this
    /// server owns (a local store, a cache it uploads to) stands behind what it holds, which
    /// is the default; an upstream cache vouches only for narinfos a trusted key verified,
    /// so a man in the middle never gets this server's signature. A store that wraps
    /// another must forward this, or it vouches for what the wrapped store would not.
    async fn narinfo_vouched(&self, digest: &Digest) -> Result<Vouched<NarInfo>> {
        Ok(Vouched {
            value: self.narinfo(digest).await?,
            vouched: true,
        })
    }

    /// The file a narinfo's `URL:` names, or a slice of it.
    async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob>;

    /// The `.ls` listing of an object's NAR, as JSON text.
    async fn listing(&self, digest: &Digest) -> Result<String>;

    /// The build log of a derivation (`<digest>-<name>.drv`), uncompressed.
    async fn log(&self, drv: &str) -> Result<Blob>;

    /// The realisation `id` (`sha256:<drv hash>!<output>`, checked by the caller with
    /// [`realisation::check_id`]) of a content-addressed derivation's output, as Nix's JSON.
    async fn realisation(&self, id: &str) -> Result<String> {
        Err(StoreError::NotFound(realisation::key(id)))
    }

    /// The realisations whose output is the object with this digest, as (id, JSON): what
    /// `upload` writes along with the object. Only a local store knows them.
    async fn realisations_of(&self, _digest: &Digest) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    /// Writes a realisation; callers write it only after its output's narinfo.
    async fn put_realisation(&self, id: &str, _json: &str) -> Result<()> {
        Err(StoreError::Unsupported(format!(
            "{} cannot store realisations ({id})",
            self.describe()
        )))
    }

    /// The digests of every object in the store (order unspecified).
    async fn list(&self) -> Result<Vec<Digest>>;

    /// Writes a NAR file under `url` (relative, as it will appear in the narinfo).
    async fn put_nar(&self, url: &str, data: ByteStream) -> Result<u64>;

    /// Writes a narinfo; callers write it only after its NAR and references exist.
    async fn put_narinfo(&self, info: &NarInfo) -> Result<()>;

    /// Writes an object's `.ls` listing.
    async fn put_listing(&self, digest: &Digest, json: &str) -> Result<()>;

    /// Writes a derivation's build log.
    async fn put_log(&self, drv: &str, data: ByteStream) -> Result<()>;

    /// True when a file exists at `url` (a NAR URL, or `<digest>.narinfo`).
    async fn exists(&self, url: &str) -> Result<bool>;

    /// Gets the store ready to receive uploads of paths from `store_dir` (a binary cache
    /// writes its `nix-cache-info`, and refuses one made for another store directory).
    async fn prepare_for_upload(&self, _store_dir: &crate::formats::StoreDir) -> Result<()> {
        Ok(())
    }

    /// The watch on this store's availability when it is served behind a
    /// [`guarded::GuardedStore`] (for a store in front of another, the front one's).
    fn health(&self) -> Option<Arc<guarded::StoreHealth>> {
        None
    }
}

/// Restricts a stream to `[start, end)` of its bytes, discarding what comes before and
/// dropping the source as soon as `end` is reached (which stops whatever produces it).
pub fn slice_stream(stream: ByteStream, start: u64, end: u64) -> ByteStream {
    use futures::future::ready;
    Box::pin(
        stream
            .scan(0u64, move |pos, chunk| {
                if *pos >= end {
                    return ready(None);
                }
                ready(Some(chunk.map(|c| {
                    let len = c.len() as u64;
                    let from = start.saturating_sub(*pos).min(len);
                    let to = end.saturating_sub(*pos).min(len);
                    *pos += len;
                    c.slice(from as usize..to.max(from) as usize)
                })))
            })
            .filter(|c| ready(!matches!(c, Ok(c) if c.is_empty()))),
    )
}

/// The URL a store that is a Nix store (local, ssh) gives an object's NAR: `nar/<digest>.nar`.
pub fn nar_url_of(digest: &str) -> String {
    format!("nar/{digest}.nar")
}

/// The digest a [`nar_url_of`] URL names, and the NAR hash (nixbase32) that nix-serve's
/// form of it, `nar/<digest>-<narhash>.nar`, adds.
pub fn parse_nar_url(url: &str) -> Option<(&str, Option<&str>)> {
    let stem = url.strip_prefix("nar/")?.strip_suffix(".nar")?;
    Some(match stem.split_once('-') {
        Some((digest, nar_hash)) => (digest, Some(nar_hash)),
        None => (stem, None),
    })
}

/// The digest a [`nar_url_of`] URL (or nix-serve's form of it) names.
pub fn digest_of_nar_url(url: &str) -> Option<&str> {
    parse_nar_url(url).map(|(digest, _)| digest)
}

/// The object a [`nar_url_of`] URL names, found by `lookup` (given its digest). A URL of
/// another shape, or a malformed digest, is a NAR this store does not have.
///
/// nix-serve's URLs, `nar/<digest>-<narhash>.nar`, are answered too: clients and caches in
/// front keep narinfos from a nix-serve that this server replaced. The NAR hash must be the
/// object's (`nar_hash` gives it in nixbase32): a path deleted and built again since is
/// another NAR, which the old narinfo's hashes would reject.
pub async fn object_of_nar_url<'u, T, F, Fut>(
    url: &'u str,
    lookup: F,
    nar_hash: impl FnOnce(&T) -> String,
) -> Result<T>
where
    F: FnOnce(&'u str) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let (digest, wanted) = parse_nar_url(url).ok_or_else(|| StoreError::NotFound(url.into()))?;
    match lookup(digest).await {
        Err(StoreError::Invalid(_)) => Err(StoreError::NotFound(url.into())),
        Ok(object) => match wanted {
            Some(h) if h != nar_hash(&object) => Err(StoreError::NotFound(format!(
                "{url}: the path's NAR hash is another now (it was built again); the narinfo that named this URL is stale"
            ))),
            _ => Ok(object),
        },
        other => other,
    }
}

/// The digest a `<digest>.narinfo` or [`nar_url_of`] URL names (what `exists` is asked about).
pub fn digest_of_object_url(url: &str) -> Option<&str> {
    url.strip_suffix(".narinfo")
        .or_else(|| digest_of_nar_url(url))
}
