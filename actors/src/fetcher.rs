//! The fetcher actor: the one place a served store is asked for data.
//!
//! Its handlers only start a future ([`ResponseFuture`]) and return, so one fetcher serves
//! any number of concurrent requests; how many of them reach the store at once is what the
//! store's [`Budgets`] allow, one budget per kind of work (metadata, NAR opens), so that a
//! burst of one kind waits for its own slots without holding up the other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message, ResponseFuture};

use crate::budget::{self, BudgetRef, Budgets};
use crate::formats::{CacheInfo, Digest, NarInfo};
use crate::metrics::Metrics;
use crate::store::{Blob, ByteRange, Store, StoreError, Vouched};

/// Ask the store for a narinfo by store-path digest, and whether this server vouches for it.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vouched<NarInfo>, StoreError>")]
pub struct FetchNarInfo(pub Digest);

/// Open the file a narinfo `URL:` names (or a range of it) as a byte stream.
#[derive(Debug, Message)]
#[rtype(result = "Result<Blob, StoreError>")]
pub struct OpenNar {
    /// The URL as the narinfo names it (a key relative to the cache root).
    pub url: String,
    /// The bytes wanted; `None` for all.
    pub range: Option<ByteRange>,
}

/// Ask for the store's `nix-cache-info`.
#[derive(Debug, Message)]
#[rtype(result = "Result<CacheInfo, StoreError>")]
pub struct FetchCacheInfo;

/// Ask for an object's `.ls` listing.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, StoreError>")]
pub struct FetchListing(pub Digest);

/// Ask for a derivation's build log.
#[derive(Debug, Message)]
#[rtype(result = "Result<Blob, StoreError>")]
pub struct FetchLog(pub String);

/// Ask for the digests of every object in the store.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Digest>, StoreError>")]
pub struct ListObjects;

/// Owns a store and runs requests against it with a timeout, within its budgets.
pub struct Fetcher {
    store: Arc<dyn Store>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    budgets: Budgets,
}

impl Fetcher {
    /// A fetcher for `store`; operations longer than `timeout` fail as backend errors. Every
    /// fetcher of one store shares its `budgets`.
    pub fn new(
        store: Arc<dyn Store>,
        timeout: Duration,
        metrics: Arc<Metrics>,
        budgets: Budgets,
    ) -> Fetcher {
        Fetcher {
            store,
            timeout,
            metrics,
            budgets,
        }
    }

    /// Runs `op` against the store once a slot of `budget` is free, with the
    /// timeout (which starts with the slot: time spent waiting is not the store's) and error
    /// accounting.
    fn run<T: 'static, F>(
        &self,
        budget: &BudgetRef,
        what: String,
        op: impl FnOnce(Arc<dyn Store>) -> F,
    ) -> ResponseFuture<Result<T, StoreError>>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + 'static,
    {
        let fut = op(self.store.clone());
        let timeout = self.timeout;
        let metrics = self.metrics.clone();
        let budget = budget.clone();
        Box::pin(async move {
            let _slot = budget::acquire(&budget).await?;
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::backend(
                    what,
                    format!("timed out after {timeout:?}"),
                )),
            };
            if matches!(
                r,
                Err(StoreError::Backend { .. }) | Err(StoreError::Corrupt(_))
            ) {
                Metrics::add(&metrics.backend_errors, 1);
            }
            r
        })
    }
}

impl Actor for Fetcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Handlers return at once; a deeper mailbox only smooths bursts.
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<FetchNarInfo> for Fetcher {
    type Result = ResponseFuture<Result<Vouched<NarInfo>, StoreError>>;

    fn handle(&mut self, msg: FetchNarInfo, _: &mut Context<Self>) -> Self::Result {
        let metrics = self.metrics.clone();
        Metrics::add(&metrics.backend_narinfo_fetches, 1);
        let digest = msg.0;
        self.run(
            &self.budgets.metadata,
            format!("fetching {digest}.narinfo"),
            move |s| async move {
                let started = Instant::now();
                let r = s.narinfo_vouched(&digest).await;
                Metrics::add(
                    &metrics.backend_narinfo_micros,
                    started.elapsed().as_micros() as u64,
                );
                r
            },
        )
    }
}

impl Handler<OpenNar> for Fetcher {
    type Result = ResponseFuture<Result<Blob, StoreError>>;

    fn handle(&mut self, msg: OpenNar, _: &mut Context<Self>) -> Self::Result {
        Metrics::add(&self.metrics.backend_nar_opens, 1);
        self.run(
            &self.budgets.nar_opens,
            format!("opening {}", msg.url),
            move |s| async move { s.nar(&msg.url, msg.range).await },
        )
    }
}

impl Handler<FetchCacheInfo> for Fetcher {
    type Result = ResponseFuture<Result<CacheInfo, StoreError>>;

    fn handle(&mut self, _: FetchCacheInfo, _: &mut Context<Self>) -> Self::Result {
        self.run(
            &self.budgets.metadata,
            "reading nix-cache-info".into(),
            |s| async move { s.cache_info().await },
        )
    }
}

impl Handler<FetchListing> for Fetcher {
    type Result = ResponseFuture<Result<String, StoreError>>;

    fn handle(&mut self, msg: FetchListing, _: &mut Context<Self>) -> Self::Result {
        self.run(
            &self.budgets.metadata,
            format!("reading {}.ls", msg.0),
            move |s| async move { s.listing(&msg.0).await },
        )
    }
}

impl Handler<FetchLog> for Fetcher {
    type Result = ResponseFuture<Result<Blob, StoreError>>;

    fn handle(&mut self, msg: FetchLog, _: &mut Context<Self>) -> Self::Result {
        self.run(
            &self.budgets.nar_opens,
            format!("reading log/{}", msg.0),
            move |s| async move { s.log(&msg.0).await },
        )
    }
}

impl Handler<ListObjects> for Fetcher {
    type Result = ResponseFuture<Result<Vec<Digest>, StoreError>>;

    fn handle(&mut self, _: ListObjects, _: &mut Context<Self>) -> Self::Result {
        Metrics::add(&self.metrics.backend_listings, 1);
        self.run(
            &self.budgets.metadata,
            "listing the store".into(),
            |s| async move { s.list().await },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::BudgetSizes;
    use crate::store::ByteStream;
    use async_trait::async_trait;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::watch;

    /// Where a store call waits until the test opens it, counting who is inside.
    struct Gate {
        open: watch::Receiver<bool>,
        inside: AtomicUsize,
        most: AtomicUsize,
    }

    impl Gate {
        fn new(open: bool) -> (watch::Sender<bool>, Gate) {
            let (tx, rx) = watch::channel(open);
            let gate = Gate {
                open: rx,
                inside: AtomicUsize::new(0),
                most: AtomicUsize::new(0),
            };
            (tx, gate)
        }

        async fn pass(&self) {
            let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let mut open = self.open.clone();
            open.wait_for(|o| *o).await.unwrap();
            self.inside.fetch_sub(1, Ordering::SeqCst);
        }

        fn inside(&self) -> usize {
            self.inside.load(Ordering::SeqCst)
        }
    }

    /// A store whose narinfo lookups and NAR opens wait at gates.
    struct Gated {
        narinfos: Gate,
        nars: Gate,
    }

    fn unsupported<T>() -> Result<T, StoreError> {
        Err(StoreError::Unsupported("not in this test".into()))
    }

    #[async_trait]
    impl Store for Gated {
        fn describe(&self) -> String {
            "gated".into()
        }
        async fn cache_info(&self) -> Result<CacheInfo, StoreError> {
            unsupported()
        }
        async fn narinfo(&self, digest: &Digest) -> Result<NarInfo, StoreError> {
            self.narinfos.pass().await;
            Err(StoreError::NotFound(format!("{digest}.narinfo")))
        }
        async fn nar(&self, _: &str, _: Option<ByteRange>) -> Result<Blob, StoreError> {
            self.nars.pass().await;
            Ok(Blob {
                stream: Box::pin(futures::stream::once(async {
                    Ok(Bytes::from_static(b"nar"))
                })),
                span: (0, 3),
                encoding: None,
                total: 3,
            })
        }
        async fn listing(&self, _: &Digest) -> Result<String, StoreError> {
            unsupported()
        }
        async fn log(&self, _: &str) -> Result<Blob, StoreError> {
            unsupported()
        }
        async fn list(&self) -> Result<Vec<Digest>, StoreError> {
            unsupported()
        }
        async fn put_nar(&self, _: &str, _: ByteStream) -> Result<u64, StoreError> {
            unsupported()
        }
        async fn put_narinfo(&self, _: &NarInfo) -> Result<(), StoreError> {
            unsupported()
        }
        async fn put_listing(&self, _: &Digest, _: &str) -> Result<(), StoreError> {
            unsupported()
        }
        async fn put_log(&self, _: &str, _: ByteStream) -> Result<(), StoreError> {
            unsupported()
        }
        async fn exists(&self, _: &str) -> Result<bool, StoreError> {
            unsupported()
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Two fetchers (two HTTP workers) over one store and one set of budgets: with every NAR
    /// slot held, exactly the NAR budget's count of opens reaches the store and narinfo
    /// lookups still answer; with every metadata slot held, exactly that many lookups reach
    /// it; once the store answers, every request held back gets through.
    #[actix::test]
    async fn each_kind_of_work_is_bound_by_its_own_budget() {
        let (open_narinfos, narinfos) = Gate::new(true);
        let (open_nars, nars) = Gate::new(false);
        let store = Arc::new(Gated { narinfos, nars });
        let budgets = Budgets::start(BudgetSizes {
            metadata: 4,
            nar_opens: 2,
            explorer: 1,
        });
        let fetchers: Vec<_> = (0..2)
            .map(|_| {
                Fetcher::new(
                    store.clone(),
                    Duration::from_secs(30),
                    Arc::new(Metrics::default()),
                    budgets.clone(),
                )
                .start()
            })
            .collect();
        let digest = Digest::parse("5r1dlyl2wyar1nn50ry8xi6apps79m0j").unwrap();

        let opens: Vec<_> = (0..20)
            .map(|i| {
                tokio::spawn(fetchers[i % 2].send(OpenNar {
                    url: format!("nar/{i}.nar"),
                    range: None,
                }))
            })
            .collect();
        settle().await;
        assert_eq!(store.nars.inside(), 2, "NAR opens at the store");
        assert_eq!(budgets.nar_opens.counts().in_use.load(Ordering::SeqCst), 2);

        // NAR slots all held: lookups are another budget and still answer at once.
        let started = std::time::Instant::now();
        let misses =
            futures::future::join_all((0..30).map(|i| fetchers[i % 2].send(FetchNarInfo(digest))))
                .await;
        for m in misses {
            assert!(matches!(m.unwrap(), Err(StoreError::NotFound(_))));
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "lookups waited {:?} behind NAR opens",
            started.elapsed()
        );
        assert!(store.narinfos.most.load(Ordering::SeqCst) <= 4);

        // Now the lookups stall too: exactly the metadata budget's count reaches the store.
        open_narinfos.send(false).unwrap();
        let lookups: Vec<_> = (0..12)
            .map(|i| tokio::spawn(fetchers[i % 2].send(FetchNarInfo(digest))))
            .collect();
        settle().await;
        assert_eq!(store.narinfos.inside(), 4, "lookups at the store");
        assert_eq!(store.nars.inside(), 2, "NAR opens still at the store");
        assert_eq!(store.nars.most.load(Ordering::SeqCst), 2, "never more");

        // The store answers again: everything held back gets through.
        open_narinfos.send(true).unwrap();
        open_nars.send(true).unwrap();
        for o in opens {
            let blob = tokio::time::timeout(Duration::from_secs(10), o)
                .await
                .expect("every NAR open gets through")
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(blob.total, 3);
        }
        for l in lookups {
            let r = tokio::time::timeout(Duration::from_secs(10), l)
                .await
                .expect("every lookup gets through")
                .unwrap()
                .unwrap();
            assert!(matches!(r, Err(StoreError::NotFound(_))));
        }
        assert_eq!(store.nars.most.load(Ordering::SeqCst), 2);
        assert_eq!(store.narinfos.most.load(Ordering::SeqCst), 4);
        assert_eq!(budgets.metadata.counts().granted.load(Ordering::SeqCst), 42);
        assert_eq!(
            budgets.nar_opens.counts().granted.load(Ordering::SeqCst),
            20
        );
        for b in [&budgets.metadata, &budgets.nar_opens, &budgets.explorer] {
            assert_eq!(b.counts().in_use.load(Ordering::SeqCst), 0);
        }
    }
}
