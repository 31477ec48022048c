//! The lookup actor: narinfos from memory when possible, from the fetcher otherwise.
//!
//! Positive answers are kept in a size-bounded moka cache with a TTL, negative ones in a
//! second cache with a short TTL (a path missing now may be uploaded soon). Concurrent misses
//! of one digest share a single backend fetch. The cache itself is shared; each HTTP worker
//! runs its own `Lookup` actor in front of it, so lookups never queue behind one thread.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, Message, ResponseFuture};
use bytes::Bytes;
use moka::future::Cache;

use crate::fetcher::{FetchNarInfo, Fetcher};
use crate::formats::{Digest, NarInfo, SecretKey};
use crate::metrics::Metrics;
use crate::store::{StoreError, Vouched};

/// A narinfo ready to serve: parsed, signed, rendered once.
#[derive(Debug)]
pub struct ServedNarInfo {
    /// The narinfo (with any signatures this server adds).
    pub info: NarInfo,
    /// Its text, as served.
    pub text: Bytes,
    /// Strong ETag of `text`.
    pub etag: String,
    /// Set once the explorer's catalog has been told about this narinfo, so a cached narinfo
    /// costs the catalog's lock once, not on every request for it.
    pub cataloged: std::sync::atomic::AtomicBool,
    /// When (unix seconds) this narinfo last went to the access records, so a cached narinfo
    /// costs the records' lock at most once a minute.
    recorded_at: std::sync::atomic::AtomicU64,
}

impl ServedNarInfo {
    /// Whether serving this narinfo now should be noted in the access records: not when it
    /// was noted within the last minute.
    pub fn due_for_access_record(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = crate::access::unix_now();
        let last = self.recorded_at.load(Ordering::Relaxed);
        now >= last.saturating_add(crate::access::MARK_EVERY_SECS)
            && self
                .recorded_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Renders and tags a narinfo.
    pub fn new(info: NarInfo) -> ServedNarInfo {
        let text = Bytes::from(info.render());
        let h = crate::formats::Hash::sha256_of(&text);
        let etag = format!(
            "\"{}\"",
            &crate::formats::nixbase32::encode(h.digest())[..26]
        );
        ServedNarInfo {
            info,
            text,
            etag,
            cataloged: Default::default(),
            recorded_at: Default::default(),
        }
    }
}

/// Look up the narinfo of a store-path digest.
#[derive(Debug, Message)]
///
/// Fails with the store's own error (shared by every caller that waited on the same fetch):
/// the HTTP edge decides what a client sees.
#[rtype(result = "Result<Arc<ServedNarInfo>, StoreError>")]
pub struct Lookup(pub Digest);

/// Sizing of the lookup caches.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Bytes of narinfo text kept in memory.
    pub max_bytes: u64,
    /// How long a found narinfo is trusted.
    pub ttl: Duration,
    /// How long a miss is remembered.
    pub negative_ttl: Duration,
    /// Misses remembered at most. Clients choose the digests they miss, so this bounds what
    /// they can make the server hold (about 200 bytes each).
    pub max_negative: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_bytes: 64 * 1024 * 1024,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(30),
            max_negative: 100_000,
        }
    }
}

/// State shared by every worker's lookup actor.
pub struct LookupShared {
    positive: Cache<Digest, Arc<ServedNarInfo>>,
    negative: Cache<Digest, ()>,
    fetcher: Addr<Fetcher>,
    keys: Vec<SecretKey>,
    metrics: Arc<Metrics>,
    /// Counts [`LookupShared::forget`] calls, so a miss fetched while a push landed is not
    /// remembered after the push's `forget` ran.
    forgets: std::sync::atomic::AtomicU64,
}

impl LookupShared {
    /// Builds the caches in front of `fetcher`; narinfos lacking a signature by one of `keys`
    /// get one before they are cached.
    pub fn new(
        fetcher: Addr<Fetcher>,
        settings: &CacheSettings,
        keys: Vec<SecretKey>,
        metrics: Arc<Metrics>,
    ) -> Arc<LookupShared> {
        let positive = Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|k: &Digest, v: &Arc<ServedNarInfo>| {
                (k.len() + v.text.len() * 3).try_into().unwrap_or(u32::MAX)
            })
            .time_to_live(settings.ttl)
            .build();
        let negative = Cache::builder()
            .max_capacity(settings.max_negative)
            .time_to_live(settings.negative_ttl)
            .build();
        Arc::new(LookupShared {
            positive,
            negative,
            fetcher,
            keys,
            metrics,
            forgets: Default::default(),
        })
    }

    /// Forgets everything (for tests and for a store known to have changed).
    pub fn invalidate_all(&self) {
        self.positive.invalidate_all();
        self.negative.invalidate_all();
    }

    /// Forgets what the caches hold of `digest`, found or missing: after a push stored its
    /// narinfo, the next request must see it.
    pub async fn forget(&self, digest: &Digest) {
        self.forgets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.positive.invalidate(digest).await;
        self.negative.invalidate(digest).await;
    }

    /// Gauges for `/metrics`: entries of both caches (moka's counts, which trail the last
    /// few inserts until its housekeeping runs).
    pub fn render_metrics(&self) -> String {
        let mut s = String::new();
        for (name, help, v) in [
            (
                "nixcached_narinfo_cache_entries",
                "Narinfos held in memory.",
                self.positive.entry_count(),
            ),
            (
                "nixcached_narinfo_cache_weight",
                "Weighted size of the narinfos held in memory (bound: the cache's byte budget).",
                self.positive.weighted_size(),
            ),
            (
                "nixcached_narinfo_negative_entries",
                "Misses remembered in memory.",
                self.negative.entry_count(),
            ),
        ] {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
        s
    }

    /// What the caches already know of `digest` (found, or remembered missing), without a
    /// message to the lookup actor: the HTTP handler answers hits itself and sends only
    /// misses to the actor, which fetches them once however many ask.
    pub async fn remembered(
        &self,
        digest: &Digest,
    ) -> Option<Result<Arc<ServedNarInfo>, StoreError>> {
        if let Some(hit) = self.positive.get(digest).await {
            Metrics::add(&self.metrics.cache_hits, 1);
            return Some(Ok(hit));
        }
        if self.negative.contains_key(digest) {
            Metrics::add(&self.metrics.cache_hits, 1);
            return Some(Err(StoreError::NotFound(format!("{digest}.narinfo"))));
        }
        None
    }

    async fn lookup(self: Arc<Self>, digest: Digest) -> Result<Arc<ServedNarInfo>, StoreError> {
        if let Some(known) = self.remembered(&digest).await {
            return known;
        }
        Metrics::add(&self.metrics.cache_misses, 1);
        let this = self.clone();
        let d = digest;
        let forgets = self.forgets.load(std::sync::atomic::Ordering::SeqCst);
        self.positive
            .try_get_with(digest, async move {
                let fetched = this
                    .fetcher
                    .send(FetchNarInfo(d))
                    .await
                    .map_err(|e| StoreError::backend("the store's fetcher actor", e))?;
                match fetched {
                    Ok(Vouched {
                        value: mut info,
                        vouched,
                    }) => {
                        if vouched {
                            info.sign_if_missing(&this.keys);
                        }
                        Ok(Arc::new(ServedNarInfo::new(info)))
                    }
                    Err(e @ StoreError::NotFound(_)) => {
                        this.negative.insert(d, ()).await;
                        // A push may have stored it since the store was asked: its `forget`
                        // either ran after this insert (and removed it) or counted first, and
                        // then the miss is taken back here.
                        if this.forgets.load(std::sync::atomic::Ordering::SeqCst) != forgets {
                            this.negative.invalidate(&d).await;
                        }
                        Err(e)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }
}

/// The per-worker actor in front of [`LookupShared`].
pub struct LookupActor {
    shared: Arc<LookupShared>,
}

impl LookupActor {
    /// An actor over shared caches.
    pub fn new(shared: Arc<LookupShared>) -> LookupActor {
        LookupActor { shared }
    }
}

impl Actor for LookupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Lookup> for LookupActor {
    type Result = ResponseFuture<Result<Arc<ServedNarInfo>, StoreError>>;

    fn handle(&mut self, msg: Lookup, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.shared.clone().lookup(msg.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{BudgetSizes, Budgets};
    use crate::store::binary_cache::BinaryCache;
    use crate::store::blobs::Blobs;
    use crate::store::memory::MemoryBlobs;
    use crate::store::{Blob, ByteRange, ByteStream, Store};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A bucket whose reads are slow, so that concurrent misses really overlap.
    struct Slow {
        inner: MemoryBlobs,
        gets: AtomicU64,
    }

    #[async_trait::async_trait]
    impl Blobs for Slow {
        fn describe(&self) -> String {
            "slow".into()
        }
        async fn get(&self, key: &str, range: Option<ByteRange>) -> crate::store::Result<Blob> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.inner.get(key, range).await
        }
        async fn put(&self, key: &str, data: ByteStream, ct: &str) -> crate::store::Result<u64> {
            self.inner.put(key, data, ct).await
        }
        async fn head(&self, key: &str) -> crate::store::Result<Option<u64>> {
            self.inner.head(key).await
        }
        async fn list_meta(
            &self,
            prefix: &str,
        ) -> crate::store::Result<Vec<crate::store::blobs::ObjectMeta>> {
            self.inner.list_meta(prefix).await
        }
        async fn delete(&self, key: &str) -> crate::store::Result<()> {
            self.inner.delete(key).await
        }
    }

    const NARINFO: &str = "StorePath: /nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: 1240\nReferences: \n";

    /// A fetcher over `cache` with the default budgets.
    fn fetcher_over(cache: BinaryCache, metrics: &Arc<Metrics>) -> Addr<Fetcher> {
        Fetcher::new(
            Arc::new(cache),
            Duration::from_secs(5),
            metrics.clone(),
            Budgets::start(BudgetSizes::default()),
        )
        .start()
    }

    #[actix::test]
    async fn concurrent_misses_share_one_fetch_across_workers_and_misses_are_remembered() {
        let slow = Arc::new(Slow {
            inner: MemoryBlobs::new(),
            gets: AtomicU64::new(0),
        });
        let cache = BinaryCache::new(slow.clone());
        cache
            .put_narinfo(&NarInfo::parse(NARINFO).unwrap())
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let fetcher = fetcher_over(cache, &metrics);
        let shared = LookupShared::new(
            fetcher,
            &CacheSettings::default(),
            Vec::new(),
            metrics.clone(),
        );
        // Two "workers", each with its own actor over the same caches.
        let actors = [
            LookupActor::new(shared.clone()).start(),
            LookupActor::new(shared.clone()).start(),
        ];
        let digest = Digest::parse("5r1dlyl2wyar1nn50ry8xi6apps79m0j").unwrap();
        let replies =
            futures::future::join_all((0..200).map(|i| actors[i % 2].send(Lookup(digest)))).await;
        for r in replies {
            assert_eq!(*r.unwrap().unwrap().info.store_path.digest(), digest);
        }
        assert_eq!(
            slow.gets.load(Ordering::SeqCst),
            1,
            "one backend read for 200 lookups"
        );
        assert_eq!(metrics.backend_narinfo_fetches.load(Ordering::SeqCst), 1);

        let missing = Digest::parse("00000000000000000000000000000000").unwrap();
        let replies =
            futures::future::join_all((0..50).map(|_| actors[0].send(Lookup(missing)))).await;
        for r in replies {
            assert!(matches!(r.unwrap(), Err(StoreError::NotFound(_))));
        }
        let _ = actors[1].send(Lookup(missing)).await.unwrap();
        assert_eq!(
            slow.gets.load(Ordering::SeqCst),
            2,
            "one read for the miss, then the negative cache"
        );
    }

    #[actix::test]
    async fn remembered_misses_are_bounded() {
        let cache = BinaryCache::new(Arc::new(MemoryBlobs::new()));
        let metrics = Arc::new(Metrics::default());
        let fetcher = fetcher_over(cache, &metrics);
        let settings = CacheSettings {
            max_negative: 10,
            ..CacheSettings::default()
        };
        let shared = LookupShared::new(fetcher, &settings, Vec::new(), metrics);
        // 200 digests nobody has, as a client would invent them.
        for i in 0..200u32 {
            let d = format!("{i:0>32}");
            let r = shared.clone().lookup(Digest::parse(&d).unwrap()).await;
            assert!(matches!(r, Err(StoreError::NotFound(_))));
        }
        shared.negative.run_pending_tasks().await;
        assert!(
            shared.negative.entry_count() <= 10,
            "{} misses held",
            shared.negative.entry_count()
        );
        assert!(shared
            .render_metrics()
            .contains("nixcached_narinfo_negative_entries "));
    }
}
