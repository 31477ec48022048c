//! A binary cache (narinfos, NARs, listings, logs) laid out in a [`Blobs`] backend, as Nix's
//! `file://`, `s3://` and `gs://` stores lay it out.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::blobs::{check_key, Blobs};
use super::{Blob, ByteRange, ByteStream, Result, Store, StoreError};
use crate::formats::cache_info::MAX_CACHE_INFO_BYTES;
use crate::formats::compression::Compression;
use crate::formats::nar::MAX_LISTING_BYTES;
use crate::formats::narinfo::MAX_NARINFO_BYTES;
use crate::formats::{CacheInfo, Digest, NarInfo, StoreDir};

/// The key of `nix-cache-info`.
pub const CACHE_INFO_KEY: &str = "nix-cache-info";

/// A binary cache over some object storage.
#[derive(Clone)]
pub struct BinaryCache {
    blobs: Arc<dyn Blobs>,
}

impl std::fmt::Debug for BinaryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BinaryCache({})", self.blobs.describe())
    }
}

fn once(bytes: impl Into<Bytes>) -> ByteStream {
    let b: Bytes = bytes.into();
    Box::pin(futures::stream::once(async move { Ok(b) }))
}

/// The conventional key for a NAR: `nar/<filehash>.nar<ext>`, as Nix names them.
pub fn nar_key(file_hash_nix32: &str, compression: Compression) -> String {
    format!("nar/{file_hash_nix32}.nar{}", compression.extension())
}

impl BinaryCache {
    /// Wraps object storage.
    pub fn new(blobs: Arc<dyn Blobs>) -> BinaryCache {
        BinaryCache { blobs }
    }

    /// The object storage underneath.
    pub fn blobs(&self) -> &Arc<dyn Blobs> {
        &self.blobs
    }

    /// Reads a small text object whole, refusing one longer than `max` bytes (stored or
    /// decoded) or not UTF-8; one stored compressed (`narinfo-compression`, `ls-compression`)
    /// is decoded.
    pub async fn read_small(&self, key: &str, max: usize) -> Result<String> {
        let blob = self.blobs.get(key, None).await?;
        let encoding = blob.encoding;
        let bytes = blob.into_bytes_capped(max, key).await?;
        let bytes = super::encoded::decode_small(bytes, encoding, max, key).await?;
        String::from_utf8(bytes)
            .map_err(|_| StoreError::Corrupt(format!("{key} is not UTF-8 text")))
    }

    /// Writes `nix-cache-info` for `store_dir` when the cache has none; refuses a cache that
    /// belongs to another store directory, whose paths could never be substituted here.
    pub async fn ensure_cache_info(&self, store_dir: &StoreDir) -> Result<CacheInfo> {
        match self.read_small(CACHE_INFO_KEY, MAX_CACHE_INFO_BYTES).await {
            Ok(text) => {
                let info =
                    CacheInfo::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if &info.store_dir != store_dir {
                    return Err(StoreError::Invalid(format!(
                        "{} holds paths of store directory {}, not {}; use another cache or prefix",
                        self.blobs.describe(),
                        info.store_dir,
                        store_dir
                    )));
                }
                Ok(info)
            }
            Err(StoreError::NotFound(_)) => {
                let info = CacheInfo {
                    store_dir: store_dir.clone(),
                    ..CacheInfo::default()
                };
                self.blobs
                    .put(CACHE_INFO_KEY, once(info.render()), "text/x-nix-cache-info")
                    .await?;
                Ok(info)
            }
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Store for BinaryCache {
    fn describe(&self) -> String {
        self.blobs.describe()
    }

    async fn cache_info(&self) -> Result<CacheInfo> {
        match self.read_small(CACHE_INFO_KEY, MAX_CACHE_INFO_BYTES).await {
            Ok(text) => CacheInfo::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string())),
            // A cache without the file is still usable; Nix assumes the default store.
            Err(StoreError::NotFound(_)) => Ok(CacheInfo::default()),
            Err(e) => Err(e),
        }
    }

    async fn narinfo(&self, digest: &Digest) -> Result<NarInfo> {
        let key = format!("{digest}.narinfo");
        let text = self.read_small(&key, MAX_NARINFO_BYTES).await?;
        let info = NarInfo::parse(&text).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
        if info.store_path.digest() != digest {
            return Err(StoreError::Corrupt(format!(
                "{key} describes {}, another object",
                info.store_path
            )));
        }
        Ok(info)
    }

    async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob> {
        check_key(url)?;
        self.blobs.get(url, range).await
    }

    async fn listing(&self, digest: &Digest) -> Result<String> {
        self.read_small(&format!("{digest}.ls"), MAX_LISTING_BYTES)
            .await
    }

    async fn log(&self, drv: &str) -> Result<Blob> {
        crate::formats::StorePath::from_base_name(drv)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let key = format!("log/{drv}");
        let blob = self.blobs.get(&key, None).await?;
        // Stored with `log-compression` (brotli on cache.nixos.org), or plain.
        super::encoded::decode_whole(blob, super::MAX_LOG_BYTES, &key).await
    }

    async fn realisation(&self, id: &str) -> Result<String> {
        super::realisation::check_id(id)?;
        let key = super::realisation::key(id);
        let text = self
            .read_small(&key, super::realisation::MAX_REALISATION_BYTES)
            .await?;
        super::realisation::check_text(id, &text)?;
        Ok(text)
    }

    async fn put_realisation(&self, id: &str, json: &str) -> Result<()> {
        super::realisation::check_id(id)?;
        self.blobs
            .put(
                &super::realisation::key(id),
                once(json.to_owned()),
                "application/json",
            )
            .await
            .map(|_| ())
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        Ok(self
            .blobs
            .list("")
            .await?
            .into_iter()
            .filter_map(|k| {
                k.strip_suffix(".narinfo")
                    .and_then(|d| Digest::parse(d).ok())
            })
            .collect())
    }

    async fn put_nar(&self, url: &str, data: ByteStream) -> Result<u64> {
        check_key(url)?;
        self.blobs.put(url, data, "application/x-nix-nar").await
    }

    async fn put_narinfo(&self, info: &NarInfo) -> Result<()> {
        let key = format!("{}.narinfo", info.store_path.digest());
        self.blobs
            .put(&key, once(info.render()), "text/x-nix-narinfo")
            .await
            .map(|_| ())
    }

    async fn put_listing(&self, digest: &Digest, json: &str) -> Result<()> {
        self.blobs
            .put(
                &format!("{digest}.ls"),
                once(json.to_owned()),
                "application/json",
            )
            .await
            .map(|_| ())
    }

    async fn put_log(&self, drv: &str, data: ByteStream) -> Result<()> {
        crate::formats::StorePath::from_base_name(drv)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.blobs
            .put(&format!("log/{drv}"), data, "text/plain; charset=utf-8")
            .await
            .map(|_| ())
    }

    async fn exists(&self, url: &str) -> Result<bool> {
        check_key(url)?;
        Ok(self.blobs.head(url).await?.is_some())
    }

    async fn prepare_for_upload(&self, store_dir: &StoreDir) -> Result<()> {
        self.ensure_cache_info(store_dir).await.map(|_| ())
    }
}
