//! A served store watched for outages, so that one store being down never takes the daemon
//! (or the other caches in it) down.
//!
//! [`StoreHealth`] probes the store by reading its `nix-cache-info`: once at start-up, then
//! every [`CHECK_EVERY`] while it answers, at once when a request to it fails as a backend
//! failure would, and with a backoff from [`FIRST_RETRY`] up to [`MAX_RETRY`] while it does
//! not. [`GuardedStore`] puts that in front of the store: while the store is down, reads
//! fail at once with [`StoreError::Unavailable`] (a 404 for Nix) instead of each paying the
//! store's timeouts and retries, and the last `nix-cache-info` read (or Nix's default,
//! `/nix/store`) stays available so clients keep the cache configured for when it is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Blob, ByteRange, ByteStream, Result, Store, StoreError, Vouched};
use crate::formats::{CacheInfo, Digest, NarInfo, StoreDir};

/// Time between two probes of a store that answers.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);
/// Wait before the first probe after a failed one; it doubles after each failure.
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between probes of a store that is down: how late, at worst, a store that
/// came back is noticed.
pub const MAX_RETRY: Duration = Duration::from_secs(4);
/// Least time between two probes that failed requests asked for, so a burst of failures
/// costs the store one probe, not one each.
const MIN_GAP: Duration = Duration::from_secs(1);

/// What the last probe of a store found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Not probed yet (only before the cache starts serving).
    Unknown,
    /// The store answered.
    Up,
    /// The store did not answer, or answered with an error.
    Down {
        /// Why, in terms a user can act on.
        reason: String,
        /// When the store was first found down in this outage.
        since: Instant,
        /// When it is probed next.
        next_probe: Instant,
    },
}

#[derive(Debug)]
struct State {
    condition: Condition,
    /// The last `nix-cache-info` the store gave (Nix's default until then).
    cache_info: CacheInfo,
    /// What the last failed probe failed on, without the details that differ every time
    /// (timings, request ids), to tell a new cause of an outage from the same one again.
    cause: Option<String>,
}

/// Why a probe failed: the whole message, and the part of it that names the cause.
struct Failed {
    reason: String,
    cause: String,
}

/// The watch on one served store: whether it is up, why not, and its `nix-cache-info`.
pub struct StoreHealth {
    store: Arc<dyn Store>,
    description: String,
    state: Mutex<State>,
    /// A request failed as if the store were down: probe now rather than at the next check.
    wake: Notify,
    /// A probe finished.
    probed: Notify,
    started: AtomicBool,
}

impl std::fmt::Debug for StoreHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHealth")
            .field("store", &self.description)
            .field("condition", &self.condition())
            .finish_non_exhaustive()
    }
}

impl StoreHealth {
    fn new(store: Arc<dyn Store>) -> StoreHealth {
        StoreHealth {
            description: store.describe(),
            store,
            state: Mutex::new(State {
                condition: Condition::Unknown,
                cache_info: CacheInfo::default(),
                cause: None,
            }),
            wake: Notify::new(),
            probed: Notify::new(),
            started: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("store health lock")
    }

    /// What the last probe found.
    pub fn condition(&self) -> Condition {
        self.lock().condition.clone()
    }

    /// Why the store is down, or `None` while it is up (or not probed yet).
    pub fn down_reason(&self) -> Option<String> {
        match &self.lock().condition {
            Condition::Down { reason, .. } => Some(reason.clone()),
            Condition::Unknown | Condition::Up => None,
        }
    }

    /// The store's `nix-cache-info` as last read; Nix's default (`/nix/store`) until the
    /// store first answers, which is what Nix itself assumes of a cache without one.
    pub fn cache_info(&self) -> CacheInfo {
        self.lock().cache_info.clone()
    }

    /// The store directory of the objects, from [`StoreHealth::cache_info`].
    pub fn store_dir(&self) -> StoreDir {
        self.lock().cache_info.store_dir.clone()
    }

    /// Asks for a probe soon: a request failed in a way that may mean the store is down.
    pub fn suspect(&self) {
        self.wake.notify_one();
    }

    /// Starts probing the store in the background (once; later calls do nothing), each probe
    /// given `timeout`. Must be called inside a Tokio runtime, which the probing lives in.
    pub fn start(self: &Arc<Self>, timeout: Duration) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(self.clone().watch(timeout));
    }

    /// Waits up to `wait` for the first probe to finish; a store still silent by then counts
    /// as down (and its probe goes on), so start-up never waits longer than that on a store.
    pub async fn first_verdict(&self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let probed = self.probed.notified();
            if self.condition() != Condition::Unknown {
                return;
            }
            if tokio::time::timeout_at(deadline, probed).await.is_err() {
                break;
            }
        }
        let mut st = self.lock();
        if st.condition == Condition::Unknown {
            let reason = format!(
                "no answer within {} at start-up (still waiting for it; check that the store is reachable from here)",
                humantime::format_duration(wait)
            );
            tracing::warn!(
                "{} is degraded: {reason}; answering 404 to its requests and serving it again by itself once it answers (no restart needed)",
                self.description
            );
            let now = Instant::now();
            st.condition = Condition::Down {
                reason,
                since: now,
                next_probe: now,
            };
        }
    }

    async fn probe(&self, timeout: Duration) -> std::result::Result<CacheInfo, Failed> {
        match tokio::time::timeout(timeout, self.store.cache_info()).await {
            Ok(Ok(info)) => Ok(info),
            Ok(Err(e)) => Err(Failed {
                reason: e.to_string(),
                cause: match &e {
                    StoreError::Backend { context, .. } => context.clone(),
                    other => other.to_string(),
                },
            }),
            Err(_) => {
                let reason = format!(
                    "reading nix-cache-info: no answer within {}",
                    humantime::format_duration(timeout)
                );
                Err(Failed {
                    cause: reason.clone(),
                    reason,
                })
            }
        }
    }

    /// Records a probe's outcome (`retry`: the wait before the next probe when it failed)
    /// and logs the changes.
    fn record(&self, outcome: std::result::Result<CacheInfo, Failed>, retry: Duration) {
        let mut st = self.lock();
        let now = Instant::now();
        match outcome {
            Ok(info) => {
                if let Condition::Down { since, .. } = &st.condition {
                    tracing::info!(
                        "{} answers again; serving again (it was degraded for {})",
                        self.description,
                        humantime::format_duration(Duration::from_secs(since.elapsed().as_secs()))
                    );
                }
                st.condition = Condition::Up;
                st.cache_info = info;
                st.cause = None;
            }
            Err(Failed { reason, cause }) => {
                let since = match &st.condition {
                    Condition::Down { since, .. } => *since,
                    Condition::Unknown | Condition::Up => now,
                };
                // Said once per outage and per new cause, not at every probe.
                if st.cause.as_ref() != Some(&cause) {
                    tracing::warn!(
                        "{} is degraded: {reason}; answering 404 to its requests, checking it again within {} and serving it again by itself once it answers (no restart needed)",
                        self.description,
                        humantime::format_duration(MAX_RETRY)
                    );
                } else {
                    tracing::debug!("{} is still down: {reason}", self.description);
                }
                st.cause = Some(cause);
                st.condition = Condition::Down {
                    reason,
                    since,
                    next_probe: now + retry,
                };
            }
        }
    }

    async fn watch(self: Arc<Self>, timeout: Duration) {
        let mut retry = FIRST_RETRY;
        loop {
            let outcome = self.probe(timeout).await;
            let up = outcome.is_ok();
            self.record(outcome, retry);
            self.probed.notify_waiters();
            if up {
                retry = FIRST_RETRY;
                let earliest = tokio::time::Instant::now() + MIN_GAP;
                // While the store is up, a failed request is how an outage between two
                // checks is noticed; while it is down, requests are not sent to it at all.
                let woken = tokio::select! {
                    _ = tokio::time::sleep(CHECK_EVERY) => false,
                    _ = self.wake.notified() => true,
                };
                if woken {
                    tokio::time::sleep_until(earliest).await;
                }
            } else {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// A store behind its [`StoreHealth`]: reads fail at once while it is down, and failures
/// that may mean an outage get it probed. Writes pass straight through.
pub struct GuardedStore {
    inner: Arc<dyn Store>,
    health: Arc<StoreHealth>,
}

impl GuardedStore {
    /// Guards `inner`; call [`StoreHealth::start`] on [`GuardedStore::health`] to probe it.
    pub fn new(inner: Arc<dyn Store>) -> GuardedStore {
        GuardedStore {
            health: Arc::new(StoreHealth::new(inner.clone())),
            inner,
        }
    }

    /// The watch on the store.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    async fn guard<T>(&self, op: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        if let Some(reason) = self.health.down_reason() {
            return Err(StoreError::Unavailable(format!(
                "{} is down: {reason}",
                self.health.description
            )));
        }
        let r = op.await;
        if let Err(StoreError::Backend { .. }) = &r {
            self.health.suspect();
        }
        r
    }
}

#[async_trait]
impl Store for GuardedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn cache_info(&self) -> Result<CacheInfo> {
        // Clients must keep the cache configured through an outage: they get what the
        // store said last, or the default, rather than an error.
        if self.health.down_reason().is_some() {
            return Ok(self.health.cache_info());
        }
        self.guard(self.inner.cache_info()).await
    }

    async fn narinfo(&self, digest: &Digest) -> Result<NarInfo> {
        self.guard(self.inner.narinfo(digest)).await
    }

    async fn narinfo_vouched(&self, digest: &Digest) -> Result<Vouched<NarInfo>> {
        // The wrapped store decides what this server vouches for (an upstream, or a layered
        // store with one, vouches only for verified narinfos).
        self.guard(self.inner.narinfo_vouched(digest)).await
    }

    async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob> {
        self.guard(self.inner.nar(url, range)).await
    }

    async fn listing(&self, digest: &Digest) -> Result<String> {
        self.guard(self.inner.listing(digest)).await
    }

    async fn log(&self, drv: &str) -> Result<Blob> {
        self.guard(self.inner.log(drv)).await
    }

    async fn realisation(&self, id: &str) -> Result<String> {
        self.guard(self.inner.realisation(id)).await
    }

    async fn realisations_of(&self, digest: &Digest) -> Result<Vec<(String, String)>> {
        self.inner.realisations_of(digest).await
    }

    async fn put_realisation(&self, id: &str, json: &str) -> Result<()> {
        self.inner.put_realisation(id, json).await
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        self.guard(self.inner.list()).await
    }

    async fn put_nar(&self, url: &str, data: ByteStream) -> Result<u64> {
        self.inner.put_nar(url, data).await
    }

    async fn put_narinfo(&self, info: &NarInfo) -> Result<()> {
        self.inner.put_narinfo(info).await
    }

    async fn put_listing(&self, digest: &Digest, json: &str) -> Result<()> {
        self.inner.put_listing(digest, json).await
    }

    async fn put_log(&self, drv: &str, data: ByteStream) -> Result<()> {
        self.inner.put_log(drv, data).await
    }

    async fn exists(&self, url: &str) -> Result<bool> {
        self.guard(self.inner.exists(url)).await
    }

    async fn prepare_for_upload(&self, store_dir: &StoreDir) -> Result<()> {
        self.inner.prepare_for_upload(store_dir).await
    }

    fn health(&self) -> Option<Arc<StoreHealth>> {
        Some(self.health.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::binary_cache::BinaryCache;
    use crate::store::memory::MemoryBlobs;

    /// A store whose every read fails while `down` is set, as an unreachable bucket does.
    struct Flaky {
        inner: BinaryCache,
        down: AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<()> {
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::backend("reading", "connection refused"))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl Store for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        async fn cache_info(&self) -> Result<CacheInfo> {
            self.check()?;
            self.inner.cache_info().await
        }
        async fn narinfo(&self, digest: &Digest) -> Result<NarInfo> {
            self.check()?;
            self.inner.narinfo(digest).await
        }
        async fn nar(&self, url: &str, range: Option<ByteRange>) -> Result<Blob> {
            self.check()?;
            self.inner.nar(url, range).await
        }
        async fn listing(&self, digest: &Digest) -> Result<String> {
            self.check()?;
            self.inner.listing(digest).await
        }
        async fn log(&self, drv: &str) -> Result<Blob> {
            self.check()?;
            self.inner.log(drv).await
        }
        async fn list(&self) -> Result<Vec<Digest>> {
            self.check()?;
            self.inner.list().await
        }
        async fn put_nar(&self, url: &str, data: ByteStream) -> Result<u64> {
            self.inner.put_nar(url, data).await
        }
        async fn put_narinfo(&self, info: &NarInfo) -> Result<()> {
            self.inner.put_narinfo(info).await
        }
        async fn put_listing(&self, digest: &Digest, json: &str) -> Result<()> {
            self.inner.put_listing(digest, json).await
        }
        async fn put_log(&self, drv: &str, data: ByteStream) -> Result<()> {
            self.inner.put_log(drv, data).await
        }
        async fn exists(&self, url: &str) -> Result<bool> {
            self.check()?;
            self.inner.exists(url).await
        }
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn down_at_start_then_up_then_down_again() {
        let flaky = Arc::new(Flaky {
            inner: BinaryCache::new(Arc::new(MemoryBlobs::new())),
            down: AtomicBool::new(true),
        });
        let guarded = GuardedStore::new(flaky.clone());
        let health = guarded.health().clone();
        health.start(Duration::from_secs(5));
        health.first_verdict(Duration::from_secs(5)).await;
        let reason = health.down_reason().expect("down at start");
        assert!(reason.contains("connection refused"), "{reason}");
        // Reads fail at once, without reaching the store; nix-cache-info stays the default.
        let d = Digest::parse("0123456789abcdfghijklmnpqrsvwxyz").unwrap();
        assert!(matches!(
            guarded.narinfo(&d).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(guarded.cache_info().await.unwrap(), CacheInfo::default());

        flaky.down.store(false, Ordering::SeqCst);
        until("back up within the backoff", || {
            health.condition() == Condition::Up
        })
        .await;
        assert!(guarded.narinfo(&d).await.unwrap_err().is_not_found());

        // An outage between two checks: the first failed request has the store probed.
        flaky.down.store(true, Ordering::SeqCst);
        assert!(matches!(
            guarded.narinfo(&d).await,
            Err(StoreError::Backend { .. })
        ));
        until("down again long before the next regular check", || {
            health.down_reason().is_some()
        })
        .await;
    }
}
