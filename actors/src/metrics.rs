//! Counters for `/metrics`, in the Prometheus text format.
//!
//! Plain atomics: the hot paths only increment, and rendering is rare.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::upload::stats::UploadStats;

/// Process-wide counters of one served cache.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by (route, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Narinfo lookups answered from the in-memory cache.
    pub cache_hits: AtomicU64,
    /// Narinfo lookups that had to ask the store (or joined a fetch in flight).
    pub cache_misses: AtomicU64,
    /// Narinfo fetches actually sent to the backend.
    pub backend_narinfo_fetches: AtomicU64,
    /// NAR opens sent to the backend.
    pub backend_nar_opens: AtomicU64,
    /// Listings of the whole store (explorer discovery).
    pub backend_listings: AtomicU64,
    /// Total microseconds spent in backend narinfo fetches.
    pub backend_narinfo_micros: AtomicU64,
    /// Backend operations that failed or timed out.
    pub backend_errors: AtomicU64,
    /// Response body bytes sent for NARs (before any transparent zstd encoding).
    pub nar_bytes_served: AtomicU64,
    /// NAR responses sent zstd-encoded (`--transparent-zstd`).
    pub nar_zstd_encoded: AtomicU64,
    /// Upload pipelines of the same process, whose counters are shown too.
    uploads: Mutex<Vec<std::sync::Arc<UploadStats>>>,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics")
            .entry((route, status))
            .or_default() += 1;
    }

    /// Shows the counters of these upload pipelines as well.
    pub fn watch_uploads(&self, pipelines: &[std::sync::Arc<UploadStats>]) {
        self.uploads
            .lock()
            .expect("metrics")
            .extend(pipelines.iter().cloned());
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Renders all counters.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "# HELP nixcached_http_requests_total HTTP requests answered, by route and status.\n",
        );
        s.push_str("# TYPE nixcached_http_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics").iter() {
            s.push_str(&format!(
                "nixcached_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
            ));
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "nixcached_narinfo_cache_hits_total",
                "Narinfo lookups answered from memory.",
                get(&self.cache_hits),
            ),
            (
                "nixcached_narinfo_cache_misses_total",
                "Narinfo lookups not in memory.",
                get(&self.cache_misses),
            ),
            (
                "nixcached_backend_narinfo_fetches_total",
                "Narinfo fetches sent to the store.",
                get(&self.backend_narinfo_fetches),
            ),
            (
                "nixcached_backend_nar_opens_total",
                "NAR reads opened on the store.",
                get(&self.backend_nar_opens),
            ),
            (
                "nixcached_backend_listings_total",
                "Listings of the whole store (explorer discovery).",
                get(&self.backend_listings),
            ),
            (
                "nixcached_backend_errors_total",
                "Store operations that failed or timed out.",
                get(&self.backend_errors),
            ),
            (
                "nixcached_nar_bytes_served_total",
                "NAR bytes sent to clients, before any transparent zstd encoding.",
                get(&self.nar_bytes_served),
            ),
            (
                "nixcached_nar_zstd_encoded_total",
                "NAR responses sent zstd-encoded to clients that accept it.",
                get(&self.nar_zstd_encoded),
            ),
        ] {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        }
        let micros = get(&self.backend_narinfo_micros);
        s.push_str("# HELP nixcached_backend_narinfo_seconds_total Time spent fetching narinfos from the store.\n");
        s.push_str("# TYPE nixcached_backend_narinfo_seconds_total counter\n");
        s.push_str(&format!(
            "nixcached_backend_narinfo_seconds_total {}.{:06}\n",
            micros / 1_000_000,
            micros % 1_000_000
        ));
        s.push_str(&UploadStats::render(&self.uploads.lock().expect("metrics")));
        s
    }
}
