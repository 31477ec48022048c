//! The fetcher actor: the one place a served store is asked for data.
//!
//! Its handlers only start a future ([`ResponseFuture`]) and return, so one fetcher serves
//! any number of concurrent requests; the mailbox bound still pushes back when callers send
//! faster than requests can even be started.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message, ResponseFuture};

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

/// Owns a store and runs requests against it with a timeout.
pub struct Fetcher {
    store: Arc<dyn Store>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Fetcher {
    /// A fetcher for `store`; operations longer than `timeout` fail as backend errors.
    pub fn new(store: Arc<dyn Store>, timeout: Duration, metrics: Arc<Metrics>) -> Fetcher {
        Fetcher {
            store,
            timeout,
            metrics,
        }
    }

    /// Runs `op` against the store with the timeout and error accounting.
    fn run<T: 'static, F>(
        &self,
        what: String,
        op: impl FnOnce(Arc<dyn Store>) -> F,
    ) -> ResponseFuture<Result<T, StoreError>>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + 'static,
    {
        let fut = op(self.store.clone());
        let timeout = self.timeout;
        let metrics = self.metrics.clone();
        Box::pin(async move {
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
        self.run(format!("fetching {digest}.narinfo"), move |s| async move {
            let started = Instant::now();
            let r = s.narinfo_vouched(&digest).await;
            Metrics::add(
                &metrics.backend_narinfo_micros,
                started.elapsed().as_micros() as u64,
            );
            r
        })
    }
}

impl Handler<OpenNar> for Fetcher {
    type Result = ResponseFuture<Result<Blob, StoreError>>;

    fn handle(&mut self, msg: OpenNar, _: &mut Context<Self>) -> Self::Result {
        Metrics::add(&self.metrics.backend_nar_opens, 1);
        self.run(format!("opening {}", msg.url), move |s| async move {
            s.nar(&msg.url, msg.range).await
        })
    }
}

impl Handler<FetchCacheInfo> for Fetcher {
    type Result = ResponseFuture<Result<CacheInfo, StoreError>>;

    fn handle(&mut self, _: FetchCacheInfo, _: &mut Context<Self>) -> Self::Result {
        self.run("reading nix-cache-info".into(), |s| async move {
            s.cache_info().await
        })
    }
}

impl Handler<FetchListing> for Fetcher {
    type Result = ResponseFuture<Result<String, StoreError>>;

    fn handle(&mut self, msg: FetchListing, _: &mut Context<Self>) -> Self::Result {
        self.run(format!("reading {}.ls", msg.0), move |s| async move {
            s.listing(&msg.0).await
        })
    }
}

impl Handler<FetchLog> for Fetcher {
    type Result = ResponseFuture<Result<Blob, StoreError>>;

    fn handle(&mut self, msg: FetchLog, _: &mut Context<Self>) -> Self::Result {
        self.run(format!("reading log/{}", msg.0), move |s| async move {
            s.log(&msg.0).await
        })
    }
}

impl Handler<ListObjects> for Fetcher {
    type Result = ResponseFuture<Result<Vec<Digest>, StoreError>>;

    fn handle(&mut self, _: ListObjects, _: &mut Context<Self>) -> Self::Result {
        Metrics::add(&self.metrics.backend_listings, 1);
        self.run(
            "listing the store".into(),
            |s| async move { s.list().await },
        )
    }
}
