//! The background discovery that fills the catalog without hammering the store.
//!
//! Listings of the whole store (`Store::list`) run at most once per `max_list_frequency`,
//! measured from the end of the previous one (as the original's `--max-list-frequency`), and
//! only when someone looks at the index. Narinfos are fetched a few at a time
//! ([`DISCOVERY_CONCURRENCY`]), only for digests the catalog lacks (a second pass over an
//! unchanged store fetches nothing), and never beyond the catalog's room: a store larger
//! than the bound costs no fetches for objects the catalog could not keep anyway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message};
use futures::StreamExt;

use super::Catalog;
use crate::fetcher::{FetchNarInfo, Fetcher, ListObjects};
use crate::formats::Digest;
use crate::store::StoreError;

/// Narinfos discovery fetches at once (the original fetched at most 3 from buckets).
pub const DISCOVERY_CONCURRENCY: usize = 3;

/// Asks discovery to run if it is due (sent when someone looks at the index).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Discover;

/// The background discovery of one store.
pub struct Discovery {
    catalog: Arc<Catalog>,
    fetcher: Addr<Fetcher>,
    every: Duration,
}

impl Discovery {
    /// Discovery into `catalog` through `fetcher`, listing at most once per `every`.
    pub fn new(catalog: Arc<Catalog>, fetcher: Addr<Fetcher>, every: Duration) -> Discovery {
        Discovery {
            catalog,
            fetcher,
            every,
        }
    }
}

impl Actor for Discovery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Requests beyond a few are the same request: one pass answers them all.
        ctx.set_mailbox_capacity(16);
    }
}

impl Handler<Discover> for Discovery {
    type Result = ();

    fn handle(&mut self, _: Discover, ctx: &mut Context<Self>) {
        if !self.catalog.start_pass(self.every) {
            return;
        }
        let catalog = self.catalog.clone();
        let fetcher = self.fetcher.clone();
        ctx.spawn(actix::fut::wrap_future(async move {
            let started = Instant::now();
            tracing::info!("Starting discovery task...");
            let (listed, found) = match discover(&catalog, &fetcher).await {
                Ok(n) => (true, n),
                Err(e) => {
                    tracing::warn!(
                        "discovery: {e}; the index shows what lookups found until the next try"
                    );
                    (false, 0)
                }
            };
            catalog.end_pass(listed);
            tracing::info!(
                "Discovery task ended after {:?} and found {found} objects",
                started.elapsed()
            );
        }));
    }
}

/// One pass: list, fetch the narinfos the catalog lacks, then follow unknown references.
async fn discover(catalog: &Catalog, fetcher: &Addr<Fetcher>) -> Result<usize, StoreError> {
    // What failed or was missing last time gets one more try per pass.
    catalog.forget_missing();
    let listed = fetcher
        .send(ListObjects)
        .await
        .map_err(|e| StoreError::backend("store actor", e.to_string()))??;
    let found = listed.len();
    let mut todo = catalog.unknown(listed);
    // Crawl edges: references met along the way, until no new ones appear.
    while !todo.is_empty() {
        fetch_all(catalog, fetcher, std::mem::take(&mut todo)).await;
        todo = catalog.unknown_references();
    }
    if catalog.is_full() {
        tracing::warn!(
            "discovery: the explorer index is full ({} objects); objects beyond it are served but not listed",
            catalog.len()
        );
    }
    Ok(found)
}

async fn fetch_all(catalog: &Catalog, fetcher: &Addr<Fetcher>, digests: Vec<Digest>) {
    let mut results = futures::stream::iter(digests)
        // Checked as each fetch starts, not once for the batch: the catalog fills meanwhile.
        .take_while(|_| futures::future::ready(!catalog.is_full()))
        .map(|d| async move { (d, fetcher.send(FetchNarInfo(d)).await) })
        .buffer_unordered(DISCOVERY_CONCURRENCY);
    while let Some((digest, r)) = results.next().await {
        match r {
            Ok(Ok(found)) => {
                catalog.learn(&found.value);
            }
            Ok(Err(StoreError::NotFound(_))) => catalog.mark_missing(digest),
            Ok(Err(e)) => {
                tracing::warn!("discovery: {digest}.narinfo: {e}; tried again in the next pass");
                catalog.mark_missing(digest);
            }
            Err(e) => tracing::warn!("discovery: store actor: {e}"),
        }
    }
}
