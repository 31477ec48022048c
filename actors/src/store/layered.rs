//! A store in front of another: the primary (a local store or bucket) answers what it has,
//! the fallback (usually upstream caches) the rest.
//!
//! Writes go to the primary only. `nix-cache-info` is the primary's, since it names the
//! store directory and priority clients see.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Blob, ByteRange, ByteStream, Result, Store, StoreError, Vouched};
use crate::formats::{CacheInfo, Digest, NarInfo, StoreDir};

/// The primary store, falling back to another for what it lacks.
pub struct LayeredStore {
    primary: Arc<dyn Store>,
    fallback: Arc<dyn Store>,
}

impl LayeredStore {
    /// `primary` first, then `fallback`.
    pub fn new(primary: Arc<dyn Store>, fallback: Arc<dyn Store>) -> LayeredStore {
        LayeredStore { primary, fallback }
    }

    /// Runs `op` on the primary; on anything but an answer or a malformed request, on the
    /// fallback. A primary failure is logged, since the fallback hides it from clients.
    async fn either<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn(Arc<dyn Store>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match op(self.primary.clone()).await {
            Ok(v) => Ok(v),
            Err(e @ StoreError::Invalid(_)) | Err(e @ StoreError::RangeNotSatisfiable { .. }) => {
                Err(e)
            }
            Err(e) => {
                // A primary known to be down was said so once, when it went down.
                if !e.is_not_found() && !matches!(e, StoreError::Unavailable(_)) {
                    tracing::warn!(
                        "{what} from {}: {e}; trying {}",
                        self.primary.describe(),
                        self.fallback.describe()
                    );
                }
                op(self.fallback.clone()).await
            }
        }
    }
}

#[async_trait]
impl Store for LayeredStore {
    fn describe(&self) -> String {
        format!(
            "{} with upstream {}",
            self.primary.describe(),
            self.fallback.describe()
        )
    }

    async fn cache_info(&self) -> Result<CacheInfo> {
        self.primary.cache_info().await
    }

    async fn narinfo(&self, digest: &Digest) -> Result<NarInfo> {
        self.either(&format!("{digest}.narinfo"), |s| async move {
            s.narinfo(digest).await
        })
        .await
    }

    async fn narinfo_vouched(&self, digest: &Digest) -> Result<Vouched<NarInfo>> {
        self.either(&format!("{digest}.narinfo"), |s| async move {
            s.narinfo_vouched(digest).await
        })
        .await
    }

    async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob> {
        self.either(url, |s| async move { s.nar(url, range).await })
            .await
    }

    async fn listing(&self, digest: &Digest) -> Result<String> {
        self.either(&format!("{digest}.ls"), |s| async move {
            s.listing(digest).await
        })
        .await
    }

    async fn realisation(&self, id: &str) -> Result<String> {
        self.either(&super::realisation::key(id), |s| async move {
            s.realisation(id).await
        })
        .await
    }

    async fn put_realisation(&self, id: &str, json: &str) -> Result<()> {
        self.primary.put_realisation(id, json).await
    }

    async fn log(&self, drv: &str) -> Result<Blob> {
        self.either(&format!("log/{drv}"), |s| async move { s.log(drv).await })
            .await
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let mut all = self.primary.list().await?;
        match self.fallback.list().await {
            Ok(more) => {
                let mut seen: std::collections::HashSet<Digest> = all.iter().copied().collect();
                all.extend(more.into_iter().filter(|d| seen.insert(*d)));
            }
            // Upstream caches cannot be listed; the primary's objects are what there is.
            Err(StoreError::Unsupported(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(all)
    }

    async fn put_nar(&self, url: &str, data: ByteStream) -> Result<u64> {
        self.primary.put_nar(url, data).await
    }

    async fn put_narinfo(&self, info: &NarInfo) -> Result<()> {
        self.primary.put_narinfo(info).await
    }

    async fn put_listing(&self, digest: &Digest, json: &str) -> Result<()> {
        self.primary.put_listing(digest, json).await
    }

    async fn put_log(&self, drv: &str, data: ByteStream) -> Result<()> {
        self.primary.put_log(drv, data).await
    }

    async fn exists(&self, url: &str) -> Result<bool> {
        if self.primary.exists(url).await? {
            return Ok(true);
        }
        self.fallback.exists(url).await
    }

    async fn prepare_for_upload(&self, store_dir: &StoreDir) -> Result<()> {
        self.primary.prepare_for_upload(store_dir).await
    }

    fn health(&self) -> Option<Arc<super::guarded::StoreHealth>> {
        self.primary.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::binary_cache::BinaryCache;
    use crate::store::memory::MemoryBlobs;

    const A: &str = "StorePath: /nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1\nURL: nar/a.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: 1240\nReferences: \n";
    const B: &str = "StorePath: /nix/store/0r1dlyl2wyar1nn50ry8xi6apps79m0j-dir2\nURL: nar/b.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: 1240\nReferences: \n";

    fn d(s: &str) -> Digest {
        Digest::parse(s).unwrap()
    }

    fn once(s: &'static str) -> ByteStream {
        Box::pin(futures::stream::once(async move {
            Ok(bytes::Bytes::from_static(s.as_bytes()))
        }))
    }

    #[tokio::test]
    async fn primary_first_then_fallback() {
        let primary = BinaryCache::new(Arc::new(MemoryBlobs::new()));
        let fallback = BinaryCache::new(Arc::new(MemoryBlobs::new()));
        primary
            .put_narinfo(&NarInfo::parse(A).unwrap())
            .await
            .unwrap();
        primary.put_nar("nar/a.nar", once("primary")).await.unwrap();
        fallback
            .put_narinfo(&NarInfo::parse(B).unwrap())
            .await
            .unwrap();
        fallback
            .put_nar("nar/b.nar", once("fallback"))
            .await
            .unwrap();
        fallback
            .put_nar("nar/a.nar", once("shadowed"))
            .await
            .unwrap();
        let s = LayeredStore::new(Arc::new(primary), Arc::new(fallback));
        assert!(s
            .narinfo(&d("5r1dlyl2wyar1nn50ry8xi6apps79m0j"))
            .await
            .is_ok());
        assert!(s
            .narinfo(&d("0r1dlyl2wyar1nn50ry8xi6apps79m0j"))
            .await
            .is_ok());
        assert!(s
            .narinfo(&d("00000000000000000000000000000000"))
            .await
            .unwrap_err()
            .is_not_found());
        let a = s
            .nar("nar/a.nar", None)
            .await
            .unwrap()
            .into_bytes()
            .await
            .unwrap();
        assert_eq!(a, b"primary");
        let b = s
            .nar("nar/b.nar", None)
            .await
            .unwrap()
            .into_bytes()
            .await
            .unwrap();
        assert_eq!(b, b"fallback");
        let mut all = s.list().await.unwrap();
        all.sort();
        assert_eq!(all.len(), 2);
        assert!(s.exists("nar/b.nar").await.unwrap());
        assert!(!s.exists("nar/c.nar").await.unwrap());
    }
}
