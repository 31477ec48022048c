//! `s3://BUCKET`: objects in an S3 bucket (AWS or any S3-compatible server), through the
//! `object_store` crate.
//!
//! Credentials follow the standard AWS chain: a profile named in the URL, then the
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` environment, then the shared config and
//! credentials files (`AWS_PROFILE` or `default`), then web identity, the ECS/EKS container
//! endpoints and the EC2 instance metadata service. `object_store` covers the environment and
//! the last three; the `profile` module covers the shared files, which `object_store` does not
//! read, and `credential_process` the commands those files may name.
//!
//! The rest is split by idea: `options` turns a URL's settings into a client, `error` turns
//! what goes wrong into messages a user can act on (with S3's own code, which `error_code`
//! reads), and this file moves the bytes.

mod credential_process;
mod error;
mod error_code;
mod multipart;
mod options;
mod profile;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayloadMut,
};

use super::blobs::{check_key, translate_range, Blobs, ObjectMeta};
use super::{Blob, ByteRange, ByteStream, Result, StoreError};
use error::{is_no_bucket, Target};
use multipart::{Leftovers, Parts};
pub use options::{Addressing, S3Options};

/// Objects at least this big go up as a multipart upload, in parts of this size; smaller ones
/// in one `PUT`. Memory held per upload is bounded by about `PARTS_IN_FLIGHT + 1` parts.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts uploaded concurrently; more buys little on one connection and costs memory.
const PARTS_IN_FLIGHT: usize = 2;

/// Objects in an S3 bucket.
#[derive(Debug)]
pub struct S3Blobs {
    store: AmazonS3,
    options: S3Options,
    /// The bucket, endpoint and region, for error messages.
    target: Target,
    /// Set once a listing proved the bucket exists; S3 answers a missing object and a missing
    /// bucket with the same bodiless 404 to `HEAD`, so a miss is only trusted after that.
    bucket_seen: AtomicBool,
    /// Multipart uploads that failed and could not be aborted yet.
    leftovers: Arc<Leftovers>,
}

impl S3Blobs {
    /// Prepares a client for the bucket; nothing is sent until the first request.
    pub fn open(options: &S3Options) -> Result<S3Blobs> {
        let client = options.client_in(&profile::Env::from_process())?;
        Ok(S3Blobs {
            store: client.store,
            options: options.clone(),
            target: client.target,
            bucket_seen: AtomicBool::new(false),
            leftovers: Arc::default(),
        })
    }

    fn path_of(&self, key: &str) -> Result<Path> {
        check_key(key)?;
        self.full_path(key)
    }

    fn full_path(&self, key: &str) -> Result<Path> {
        let full = if self.options.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.options.prefix)
        };
        Path::parse(&full).map_err(|e| StoreError::Invalid(format!("object key {key:?}: {e}")))
    }

    fn url_of(&self, key: &str) -> String {
        match self.options.prefix.as_str() {
            "" => format!("s3://{}/{key}", self.options.bucket),
            p => format!("s3://{}/{p}/{key}", self.options.bucket),
        }
    }

    /// Whether the bucket exists: `Some(false)` only when S3 said so.
    async fn bucket_exists(&self, probe: &Path) -> Option<bool> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Some(true);
        }
        // Listing below the missing key is cheap (it matches nothing) and, unlike HEAD,
        // carries an error body that tells a missing bucket from a missing key.
        match self.store.list_with_delimiter(Some(probe)).await {
            Ok(_) => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Some(true)
            }
            Err(e) if is_no_bucket(&e) => Some(false),
            Err(_) => None,
        }
    }

    /// Turns an `object_store` error into what a user can act on.
    async fn fail(&self, doing: &str, key: &str, e: object_store::Error) -> StoreError {
        if is_no_bucket(&e) {
            return self.target.no_bucket(e);
        }
        if let object_store::Error::NotFound { .. } = e {
            let probe = self.full_path(key).unwrap_or_default();
            if self.bucket_exists(&probe).await == Some(false) {
                return self.target.no_bucket(e);
            }
            return StoreError::NotFound(key.into());
        }
        self.target.classify(doing, &self.url_of(key), e)
    }
}

/// Maps a request range to S3's; `None` when it cannot select anything whatever the size.
fn get_range(range: ByteRange) -> Option<GetRange> {
    match range {
        ByteRange::Span { start, end: None } => Some(GetRange::Offset(start)),
        ByteRange::Span {
            start,
            end: Some(end),
        } => (end > start).then_some(GetRange::Bounded(start..end)),
        ByteRange::Last(0) => None,
        ByteRange::Last(n) => Some(GetRange::Suffix(n)),
    }
}

#[async_trait]
impl Blobs for S3Blobs {
    fn describe(&self) -> String {
        self.options.describe()
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        let path = self.path_of(key)?;
        let range_s3 = translate_range(self, key, range, get_range).await?;
        let opts = GetOptions {
            range: range_s3,
            ..GetOptions::default()
        };
        match (self.store.get_opts(&path, opts).await, range) {
            (Ok(res), _) => {
                let total = res.meta.size;
                let span = (res.range.start, res.range.end);
                let encoding = res
                    .attributes
                    .get(&Attribute::ContentEncoding)
                    .and_then(|v| crate::store::encoded::from_header(v));
                let stream = res.into_stream().map_err(io::Error::from);
                Ok(Blob {
                    stream: Box::pin(stream),
                    span,
                    encoding,
                    total,
                })
            }
            // S3 answers 416 to a range past the end; the caller needs the size with it.
            (Err(e), Some(r)) if !matches!(e, object_store::Error::NotFound { .. }) => {
                match self.unsatisfiable(key, r).await {
                    err @ StoreError::RangeNotSatisfiable { .. } => Err(err),
                    _ => Err(self.fail("reading", key, e).await),
                }
            }
            (Err(e), _) => Err(self.fail("reading", key, e).await),
        }
    }

    async fn put(&self, key: &str, mut data: ByteStream, content_type: &str) -> Result<u64> {
        let path = self.path_of(key)?;
        let attributes: Attributes = [(
            Attribute::ContentType,
            AttributeValue::from(content_type.to_owned()),
        )]
        .into_iter()
        .collect();
        let receiving = |e: io::Error| StoreError::backend(format!("receiving data for {key}"), e);

        // Narinfos and listings are tiny: one PUT. Only what outgrows a part goes multipart.
        let mut first = PutPayloadMut::new();
        let mut n = 0u64;
        while first.content_length() < PART_SIZE {
            match data.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(receiving)?;
                    n += chunk.len() as u64;
                    first.push(chunk);
                }
                None => {
                    let opts = PutOptions {
                        attributes,
                        ..PutOptions::default()
                    };
                    return match self.store.put_opts(&path, first.freeze(), opts).await {
                        Ok(_) => Ok(n),
                        Err(e) => Err(self.fail("writing", key, e).await),
                    };
                }
            }
        }

        let opts = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        // Parts a fault left behind go before new ones are made.
        self.leftovers.sweep().await;
        let upload = match self.store.put_multipart_opts(&path, opts).await {
            Ok(u) => u,
            Err(e) => return Err(self.fail("writing", key, e).await),
        };
        let mut parts = Parts::new(
            &self.url_of(key),
            upload,
            PART_SIZE,
            PARTS_IN_FLIGHT,
            self.leftovers.clone(),
        );
        // The bytes read so far, then the rest, counted afresh.
        let mut all = futures::stream::iter(first.freeze().into_iter().map(Ok)).chain(data);
        let mut n = 0u64;
        while let Some(chunk) = all.next().await {
            // An error from the source (a failed hash check, a dropped connection) must not
            // leave a truncated object behind: abort, so S3 never assembles the parts.
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    parts.abort().await;
                    return Err(receiving(e));
                }
            };
            n += chunk.len() as u64;
            if let Err(e) = parts.write(chunk).await {
                parts.abort().await;
                return Err(self.fail("writing", key, e).await);
            }
        }
        match parts.finish().await {
            Ok(()) => Ok(n),
            Err(e) => Err(self.fail("writing", key, e).await),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match self.store.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) => match self.fail("removing", key, e).await {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path_of(key)?;
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) => match self.fail("checking", key, e).await {
                StoreError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let rel = prefix.trim_end_matches('/');
        if !rel.is_empty() {
            check_key(rel)?;
        }
        let full = match (self.options.prefix.as_str(), rel) {
            ("", r) => r.to_owned(),
            (p, "") => p.to_owned(),
            (p, r) => format!("{p}/{r}"),
        };
        let path = if full.is_empty() {
            None
        } else {
            Some(
                Path::parse(&full)
                    .map_err(|e| StoreError::Invalid(format!("prefix {prefix:?}: {e}")))?,
            )
        };
        let listed = match self.store.list_with_delimiter(path.as_ref()).await {
            Ok(l) => l,
            Err(e) => {
                let what = self.url_of(prefix);
                return Err(if is_no_bucket(&e) {
                    self.target.no_bucket(e)
                } else {
                    self.target.classify("listing", &what, e)
                });
            }
        };
        self.bucket_seen.store(true, Ordering::Relaxed);
        let strip = match self.options.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&strip)?.to_owned();
                Some(ObjectMeta {
                    key,
                    size: m.size,
                    modified: Some(std::time::SystemTime::from(m.last_modified)),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_to_s3() {
        assert_eq!(
            get_range(ByteRange::span(5, None)),
            Some(GetRange::Offset(5))
        );
        assert_eq!(
            get_range(ByteRange::span(5, Some(9))),
            Some(GetRange::Bounded(5..9))
        );
        assert_eq!(get_range(ByteRange::span(5, Some(5))), None);
        assert_eq!(get_range(ByteRange::Last(3)), Some(GetRange::Suffix(3)));
        assert_eq!(get_range(ByteRange::Last(0)), None);
    }
}
