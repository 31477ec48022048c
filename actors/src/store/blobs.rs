//! Key-value object storage underneath a binary cache: a folder, an S3 or a GCS bucket.

use async_trait::async_trait;

use super::{Blob, ByteRange, ByteStream, Result, StoreError};

/// How long a connection to a bucket may move no byte before its request is abandoned and
/// retried, unless the URL's `stall-timeout` says otherwise.
pub const DEFAULT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Its key, relative to the cache.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, when the backend says.
    pub modified: Option<std::time::SystemTime>,
}

/// Objects by key, the way buckets store them.
///
/// Keys are relative, `/`-separated, and never contain `.` or `..` components; [`check_key`]
/// enforces that before any backend sees one.
#[async_trait]
pub trait Blobs: Send + Sync + 'static {
    /// A description for logs (`file:///srv/cache`).
    fn describe(&self) -> String;

    /// Reads an object or a slice of it; a missing key is [`StoreError::NotFound`].
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Blob>;

    /// Writes an object from a stream, atomically: readers see the old object or the whole new
    /// one, never a part. Returns the bytes written.
    async fn put(&self, key: &str, data: ByteStream, content_type: &str) -> Result<u64>;

    /// The size of an object, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>>;

    /// Every key directly under `prefix` (which is empty or ends in `/`), without descending.
    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_meta(prefix)
            .await?
            .into_iter()
            .map(|m| m.key)
            .collect())
    }

    /// [`Blobs::list`] with each object's size and last modification, for what decides by
    /// age (grace periods of `fsck --repair` and garbage collection).
    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Removes an object; one that does not exist is not an error (deletions are retried and
    /// may race with another process's).
    async fn delete(&self, key: &str) -> Result<()>;

    /// Why `range` of `key` cannot be served, asked after the backend refused it or it has no
    /// form there: 416 when the object exists and the range selects none of it, not found
    /// when the object does not exist.
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
}

/// `range` of `key` in a backend's own form, made by `translate`; a range with no such form
/// (it selects nothing whatever the object's size) is the error [`Blobs::unsatisfiable`] gives.
pub async fn translate_range<B: Blobs + ?Sized, T>(
    blobs: &B,
    key: &str,
    range: Option<ByteRange>,
    translate: impl FnOnce(ByteRange) -> Option<T>,
) -> Result<Option<T>> {
    match range {
        None => Ok(None),
        Some(r) => match translate(r) {
            Some(t) => Ok(Some(t)),
            None => Err(blobs.unsatisfiable(key, r).await),
        },
    }
}

/// Refuses keys that could leave the bucket's root or confuse a file system.
pub fn check_key(key: &str) -> Result<()> {
    let bad = |why: &str| Err(StoreError::Invalid(format!("object key {key:?} {why}")));
    if key.is_empty() {
        return bad("is empty");
    }
    if key.starts_with('/') || key.contains("://") {
        return bad("must be relative to the cache root");
    }
    if key.contains('\0') || key.contains('\\') {
        return bad("contains a NUL or backslash");
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, '.' or '..' component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for k in [
            "",
            "/etc/passwd",
            "../x",
            "nar/../../x",
            "a//b",
            "./a",
            "a\\b",
            "http://x/y",
            "a/.",
        ] {
            assert!(check_key(k).is_err(), "{k:?}");
        }
        for k in [
            "nix-cache-info",
            "nar/abc.nar.xz",
            "log/x.drv",
            "abc.narinfo",
        ] {
            assert!(check_key(k).is_ok(), "{k:?}");
        }
    }
}
