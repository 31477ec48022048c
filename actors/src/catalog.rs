//! The catalog: what the explorer index knows about a store's objects, and the background
//! discovery that fills it without hammering the store.
//!
//! Three sources feed it:
//! - listings of the whole store (`Store::list`), at most one per `max_list_frequency`
//!   measured from the end of the previous one (as the original's `--max-list-frequency`),
//!   and only when someone looks at the index;
//! - every narinfo the lookup path serves (free: it was fetched anyway);
//! - references of known objects that are not known yet (crawl edges), fetched in the same
//!   background pass.
//!
//! Narinfos that discovery needs are fetched a few at a time ([`DISCOVERY_CONCURRENCY`]),
//! never all at once, and only for digests the catalog lacks, so a second pass over an
//! unchanged store fetches nothing. Closure sizes are computed from references and cached
//! until the catalog changes.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message};
use futures::StreamExt;
use serde::Serialize;

use crate::fetcher::{FetchNarInfo, Fetcher, ListObjects};
use crate::formats::{Digest, NarInfo};
use crate::store::StoreError;

/// Narinfos discovery fetches at once (the original fetched at most 3 from buckets).
pub const DISCOVERY_CONCURRENCY: usize = 3;

/// What the catalog keeps of one object.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    nar_size: u64,
    file_size: Option<u64>,
    references: Vec<String>,
}

/// How the index orders objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    /// By name, then digest.
    #[default]
    Name,
    /// Largest NAR first, then digest.
    Size,
}

impl SortBy {
    /// Parses the `sort` query parameter (unknown values sort by name).
    pub fn parse(s: &str) -> SortBy {
        match s {
            "size" => SortBy::Size,
            _ => SortBy::Name,
        }
    }

    /// The query parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            SortBy::Name => "name",
            SortBy::Size => "size",
        }
    }
}

/// One object as the index shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Store-path digest.
    pub digest: String,
    /// Store-path name.
    pub name: String,
    /// Uncompressed NAR size.
    pub nar_size: u64,
    /// Size of the stored (possibly compressed) file, when the narinfo says.
    pub file_size: Option<u64>,
    /// The closure's summed NAR size.
    pub closure_nar_size: u64,
    /// The closure's summed file size (objects without one count their NAR size).
    pub closure_file_size: u64,
    /// Objects in the closure, this one included.
    pub closure_count: usize,
    /// False when part of the closure is not in the catalog (sizes are then a lower bound).
    pub closure_complete: bool,
}

/// One page of the index.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The rows, in order.
    pub rows: Vec<Row>,
    /// The `after` key of the next page, when there is one.
    pub next_after: Option<String>,
    /// Objects matching the query in the whole catalog.
    pub matching: usize,
    /// Objects in the catalog.
    pub known: usize,
    /// True once a full listing of the store has completed.
    pub listed: bool,
    /// True while discovery runs.
    pub discovering: bool,
}

/// A summary of an object's closure.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Closure {
    /// Objects in the closure, the object included.
    pub count: usize,
    /// Summed NAR sizes.
    pub nar_size: u64,
    /// Summed file sizes.
    pub file_size: u64,
    /// False when some object of the closure is not known yet.
    pub complete: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    by_name: BTreeSet<(String, String)>,
    referrers: HashMap<String, BTreeSet<String>>,
    /// Digests a store said it does not have (references outside a cache).
    missing: HashSet<String>,
    closures: HashMap<String, Closure>,
    listed: bool,
    discovering: bool,
    last_end: Option<Instant>,
}

impl State {
    fn insert(&mut self, info: &NarInfo) -> bool {
        let digest = info.store_path.digest().to_string();
        if self.entries.contains_key(&digest) {
            return false;
        }
        let references: Vec<String> = info
            .references
            .iter()
            .map(|r| r.digest().to_string())
            .filter(|r| *r != digest)
            .collect();
        for r in &references {
            self.referrers
                .entry(r.clone())
                .or_default()
                .insert(digest.clone());
        }
        self.by_name
            .insert((info.store_path.name().to_owned(), digest.clone()));
        self.missing.remove(&digest);
        self.entries.insert(
            digest,
            Entry {
                name: info.store_path.name().to_owned(),
                nar_size: info.nar_size,
                file_size: info.file_size,
                references,
            },
        );
        // Any closure may now include the new object.
        self.closures.clear();
        true
    }

    fn closure(&mut self, digest: &str) -> Closure {
        if let Some(c) = self.closures.get(digest) {
            return *c;
        }
        let mut seen = HashSet::new();
        let mut stack = vec![digest.to_owned()];
        let mut c = Closure {
            count: 0,
            nar_size: 0,
            file_size: 0,
            complete: true,
        };
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            match self.entries.get(&d) {
                Some(e) => {
                    c.count += 1;
                    c.nar_size += e.nar_size;
                    c.file_size += e.file_size.unwrap_or(e.nar_size);
                    stack.extend(e.references.iter().cloned());
                }
                None => c.complete = false,
            }
        }
        self.closures.insert(digest.to_owned(), c);
        c
    }

    fn unknown_references(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self
            .entries
            .values()
            .flat_map(|e| e.references.iter())
            .filter(|r| !self.entries.contains_key(*r) && !self.missing.contains(*r))
            .filter_map(|r| Digest::parse(r).ok())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The shared catalog of one served store.
#[derive(Default)]
pub struct Catalog {
    state: Mutex<State>,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Arc<Catalog> {
        Arc::new(Catalog::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an object seen by the lookup path.
    pub fn learn(&self, info: &NarInfo) {
        self.lock().insert(info);
    }

    /// True when the catalog holds `digest`.
    pub fn knows(&self, digest: &str) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// Objects whose references include `digest`, as `(digest, name)` sorted by name.
    pub fn referrers(&self, digest: &str) -> Vec<(String, String)> {
        let st = self.lock();
        let mut out: Vec<(String, String)> = st
            .referrers
            .get(digest)
            .into_iter()
            .flatten()
            .filter_map(|r| st.entries.get(r).map(|e| (r.clone(), e.name.clone())))
            .collect();
        out.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        out
    }

    /// The closure summary of `digest` (as far as the catalog knows it).
    pub fn closure(&self, digest: &str) -> Option<Closure> {
        let mut st = self.lock();
        st.entries.contains_key(digest).then(|| st.closure(digest))
    }

    /// A page of the index: objects whose name contains `q` (case-insensitive), ordered by
    /// `sort`, strictly after the object `after` (keyset paging, stable while objects arrive).
    pub fn page(&self, q: &str, sort: SortBy, after: Option<&str>, limit: usize) -> Page {
        let mut st = self.lock();
        let needle = q.to_lowercase();
        let matches = |name: &str| needle.is_empty() || name.to_lowercase().contains(&needle);
        let mut keys: Vec<(String, String)> = st
            .by_name
            .iter()
            .filter(|(name, _)| matches(name))
            .cloned()
            .collect();
        let matching = keys.len();
        if sort == SortBy::Size {
            keys.sort_by_key(|(_, d)| (Reverse(st.entries[d].nar_size), d.clone()));
        }
        let start = match after.and_then(|a| st.entries.get(a).map(|e| (a, e))) {
            None => 0,
            Some((a, e)) => match sort {
                SortBy::Name => {
                    let key = (e.name.clone(), a.to_owned());
                    keys.partition_point(|k| *k <= key)
                }
                SortBy::Size => {
                    let key = (Reverse(e.nar_size), a.to_owned());
                    keys.partition_point(|(_, d)| {
                        (Reverse(st.entries[d].nar_size), d.clone()) <= key
                    })
                }
            },
        };
        let slice: Vec<(String, String)> = keys[start.min(keys.len())..]
            .iter()
            .take(limit + 1)
            .cloned()
            .collect();
        let more = slice.len() > limit;
        let rows: Vec<Row> = slice
            .into_iter()
            .take(limit)
            .map(|(name, digest)| {
                let c = st.closure(&digest);
                let e = &st.entries[&digest];
                Row {
                    name,
                    nar_size: e.nar_size,
                    file_size: e.file_size,
                    closure_nar_size: c.nar_size,
                    closure_file_size: c.file_size,
                    closure_count: c.count,
                    closure_complete: c.complete,
                    digest,
                }
            })
            .collect();
        Page {
            next_after: more
                .then(|| rows.last().map(|r| r.digest.clone()))
                .flatten(),
            rows,
            matching,
            known: st.entries.len(),
            listed: st.listed,
            discovering: st.discovering,
        }
    }
}

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
        {
            let mut st = self.catalog.lock();
            let due = st.last_end.is_none_or(|t| t.elapsed() >= self.every);
            if st.discovering || !due {
                return;
            }
            st.discovering = true;
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
            let mut st = catalog.lock();
            st.discovering = false;
            st.listed |= listed;
            st.last_end = Some(Instant::now());
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
    catalog.lock().missing.clear();
    let listed = fetcher
        .send(ListObjects)
        .await
        .map_err(|e| StoreError::backend("store actor", e.to_string()))??;
    let found = listed.len();
    let mut todo: Vec<Digest> = listed.into_iter().filter(|d| !catalog.knows(d)).collect();
    // Crawl edges: references met along the way, until no new ones appear.
    while !todo.is_empty() {
        fetch_all(catalog, fetcher, std::mem::take(&mut todo)).await;
        todo = catalog.lock().unknown_references();
    }
    Ok(found)
}

async fn fetch_all(catalog: &Catalog, fetcher: &Addr<Fetcher>, digests: Vec<Digest>) {
    let mut results = futures::stream::iter(digests)
        .map(|d| async move { (d, fetcher.send(FetchNarInfo(d)).await) })
        .buffer_unordered(DISCOVERY_CONCURRENCY);
    while let Some((digest, r)) = results.next().await {
        match r {
            Ok(Ok(found)) => catalog.learn(&found.value),
            Ok(Err(StoreError::NotFound(_))) => {
                catalog.lock().missing.insert(digest.to_string());
            }
            Ok(Err(e)) => {
                tracing::warn!("discovery: {digest}.narinfo: {e}; tried again in the next pass");
                catalog.lock().missing.insert(digest.to_string());
            }
            Err(e) => tracing::warn!("discovery: store actor: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, digest_char: char, size: u64, refs: &[char]) -> NarInfo {
        let d = |c: char| std::iter::repeat_n(c, 32).collect::<String>();
        let refs: Vec<String> = refs.iter().map(|c| format!("{}-r", d(*c))).collect();
        NarInfo::parse(&format!(
            "StorePath: /nix/store/{}-{name}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: {size}\nReferences: {}\n",
            d(digest_char),
            refs.join(" ")
        ))
        .unwrap()
    }

    #[test]
    fn pages_sorts_closures_and_referrers() {
        let c = Catalog::default();
        c.learn(&info("lib", 'a', 10, &[]));
        c.learn(&info("lib", 'b', 100, &['a']));
        c.learn(&info("lib", 'c', 1000, &['b', 'c']));
        c.learn(&info("other", 'd', 5, &['z']));
        let first = c.page("", SortBy::Name, None, 2);
        assert_eq!(first.matching, 4);
        let names: Vec<&str> = first.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["lib", "lib"]);
        let next = c.page("", SortBy::Name, first.next_after.as_deref(), 2);
        let names: Vec<&str> = next.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["lib", "other"]);
        assert!(next.next_after.is_none());
        assert!(!next.rows[1].closure_complete, "z is unknown");
        let by_size = c.page("LIB", SortBy::Size, None, 10);
        let sizes: Vec<u64> = by_size.rows.iter().map(|r| r.nar_size).collect();
        assert_eq!(sizes, [1000, 100, 10]);
        assert_eq!(by_size.rows[0].closure_nar_size, 1110);
        assert_eq!(by_size.rows[0].closure_count, 3);
        assert!(by_size.rows[0].closure_complete);
        let after = c.page("lib", SortBy::Size, Some(&by_size.rows[0].digest), 1);
        assert_eq!(after.rows[0].nar_size, 100);
        assert!(after.next_after.is_some());
        let a = "a".repeat(32);
        assert_eq!(c.referrers(&a).len(), 1);
        assert_eq!(
            c.lock().unknown_references(),
            vec![Digest::parse(&"z".repeat(32)).unwrap()]
        );
    }
}
