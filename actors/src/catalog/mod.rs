//! The catalog: what the explorer index knows about a store's objects.
//!
//! Two sources feed it: the background [`discovery`] (listings of the whole store and the
//! references they lead to) and every narinfo the lookup path serves (free: it was fetched
//! anyway). Only objects whose narinfo a store returned are ever learned, so clients asking
//! for digests that do not exist add nothing; and the catalog holds at most `max_objects`
//! (beyond that, objects are still served, just not listed), so nothing a client or a store
//! does grows it without bound.
//!
//! Index pages never sort the catalog: the orders the index shows (by name, by size) are
//! kept incrementally in B-trees keyed by `(name, digest)` and `(size, digest)`, and a page
//! seeks to its `after` key and reads `limit` entries. Searches scan the lower-cased
//! [`names`] in one pass. Closure sizes are computed from references for the rows shown and
//! cached until the catalog changes.

pub mod discovery;
mod names;

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::formats::{Digest, NarInfo};
pub use discovery::{Discover, Discovery};
use names::{Names, Needle};

/// Objects a catalog holds unless told otherwise: a daemon holding that many peaked at
/// 664 MiB (BENCHMARKS.md), and its index pages still answered in under 110 ms.
pub const DEFAULT_MAX_OBJECTS: usize = 1_000_000;

/// A search matching at most one object in this many collects its matches and picks the
/// page among them; a denser one walks the sorted order, where matches come soon.
const SPARSE: usize = 8;

/// Closure summaries kept between catalog changes; beyond this the cache starts over, so
/// browsing every page of a huge catalog cannot grow it without bound.
const MAX_CACHED_CLOSURES: usize = 100_000;

/// What the catalog keeps of one object.
#[derive(Debug)]
struct Entry {
    digest: Digest,
    /// Shared with the by-name order, so a name is stored once.
    name: Arc<str>,
    nar_size: u64,
    file_size: Option<u64>,
    references: Box<[Digest]>,
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
    /// True when the catalog holds all it may: objects beyond are served but not listed.
    pub full: bool,
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
    /// Object number of each known digest: its place in `objects` and its line in `names`.
    ids: HashMap<Digest, u32>,
    objects: Vec<Entry>,
    by_name: BTreeSet<(Arc<str>, Digest)>,
    by_size: BTreeSet<(Reverse<u64>, Digest)>,
    names: Names,
    /// Known objects referring to each digest.
    referrers: HashMap<Digest, Vec<Digest>>,
    /// Digests a store said it does not have (references outside a cache); only references
    /// of known objects get here, so it is bounded by the catalog.
    missing: HashSet<Digest>,
    closures: HashMap<Digest, Closure>,
    listed: bool,
    discovering: bool,
    last_end: Option<Instant>,
}

impl State {
    fn entry(&self, digest: &Digest) -> Option<&Entry> {
        self.ids.get(digest).map(|&id| &self.objects[id as usize])
    }

    fn insert(&mut self, info: &NarInfo) -> bool {
        let digest = *info.store_path.digest();
        if self.ids.contains_key(&digest) {
            return false;
        }
        let mut references: Vec<Digest> = info
            .references
            .iter()
            .map(|r| *r.digest())
            .filter(|r| *r != digest)
            .collect();
        references.sort_unstable();
        references.dedup();
        for r in &references {
            self.referrers.entry(*r).or_default().push(digest);
        }
        let name: Arc<str> = Arc::from(info.store_path.name());
        self.by_name.insert((name.clone(), digest));
        self.by_size.insert((Reverse(info.nar_size), digest));
        self.names.push(&name);
        self.missing.remove(&digest);
        let id = u32::try_from(self.objects.len()).expect("the catalog bound is below 2^32");
        self.ids.insert(digest, id);
        self.objects.push(Entry {
            digest,
            name,
            nar_size: info.nar_size,
            file_size: info.file_size,
            references: references.into_boxed_slice(),
        });
        // Any closure may now include the new object.
        self.closures.clear();
        true
    }

    fn closure(&mut self, digest: &Digest) -> Closure {
        if let Some(c) = self.closures.get(digest) {
            return *c;
        }
        let mut seen = HashSet::new();
        let mut stack = vec![*digest];
        let mut c = Closure {
            count: 0,
            nar_size: 0,
            file_size: 0,
            complete: true,
        };
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            match self.entry(&d) {
                Some(e) => {
                    c.count += 1;
                    c.nar_size += e.nar_size;
                    c.file_size += e.file_size.unwrap_or(e.nar_size);
                    stack.extend(e.references.iter().copied());
                }
                None => c.complete = false,
            }
        }
        if self.closures.len() >= MAX_CACHED_CLOSURES {
            self.closures.clear();
        }
        self.closures.insert(*digest, c);
        c
    }

    fn unknown_references(&self) -> Vec<Digest> {
        // Every referenced digest is a key of `referrers`, once.
        let mut out: Vec<Digest> = self
            .referrers
            .keys()
            .filter(|r| !self.ids.contains_key(*r) && !self.missing.contains(*r))
            .copied()
            .collect();
        out.sort_unstable();
        out
    }

    /// Up to `take` objects in `sort` order strictly after object `after`, whose names pass
    /// `keep`: a seek into the kept order, then a walk.
    fn walk(
        &self,
        sort: SortBy,
        after: Option<u32>,
        take: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<u32> {
        let after = after.map(|id| &self.objects[id as usize]);
        match sort {
            SortBy::Name => {
                let from = match after {
                    Some(e) => Bound::Excluded((e.name.clone(), e.digest)),
                    None => Bound::Unbounded,
                };
                self.by_name
                    .range((from, Bound::Unbounded))
                    .filter(|(name, _)| keep(&name[..]))
                    .take(take)
                    .map(|(_, d)| self.ids[d])
                    .collect()
            }
            SortBy::Size => {
                let from = match after {
                    Some(e) => Bound::Excluded((Reverse(e.nar_size), e.digest)),
                    None => Bound::Unbounded,
                };
                self.by_size
                    .range((from, Bound::Unbounded))
                    .map(|(_, d)| self.ids[d])
                    .filter(|&id| keep(&self.objects[id as usize].name))
                    .take(take)
                    .collect()
            }
        }
    }

    /// The first `take` of `ids` in `sort` order strictly after object `after`, without
    /// sorting them all (for the few matches of a rare search).
    fn pick(&self, mut ids: Vec<u32>, sort: SortBy, after: Option<u32>, take: usize) -> Vec<u32> {
        fn first<K: Ord>(
            ids: &mut Vec<u32>,
            after: Option<u32>,
            take: usize,
            key: impl Fn(u32) -> K,
        ) {
            if let Some(a) = after {
                let a = key(a);
                ids.retain(|&id| key(id) > a);
            }
            if ids.len() > take {
                ids.select_nth_unstable_by(take, |&x, &y| key(x).cmp(&key(y)));
                ids.truncate(take);
            }
            ids.sort_unstable_by_key(|&x| key(x));
        }
        let o = &self.objects;
        match sort {
            SortBy::Name => first(&mut ids, after, take, |id| {
                let e = &o[id as usize];
                (&*e.name, e.digest)
            }),
            SortBy::Size => first(&mut ids, after, take, |id| {
                let e = &o[id as usize];
                (Reverse(e.nar_size), e.digest)
            }),
        }
        ids
    }

    fn row(&mut self, id: u32) -> Row {
        let digest = self.objects[id as usize].digest;
        let c = self.closure(&digest);
        let e = &self.objects[id as usize];
        Row {
            digest: digest.to_string(),
            name: e.name.to_string(),
            nar_size: e.nar_size,
            file_size: e.file_size,
            closure_nar_size: c.nar_size,
            closure_file_size: c.file_size,
            closure_count: c.count,
            closure_complete: c.complete,
        }
    }
}

/// The shared catalog of one served store.
pub struct Catalog {
    state: Mutex<State>,
    max_objects: usize,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::with_room(DEFAULT_MAX_OBJECTS)
    }
}

impl Catalog {
    /// An empty catalog that holds at most `max_objects` (clamped to what object numbers
    /// can address).
    pub fn new(max_objects: usize) -> Arc<Catalog> {
        Arc::new(Catalog::with_room(max_objects))
    }

    fn with_room(max_objects: usize) -> Catalog {
        Catalog {
            state: Mutex::default(),
            max_objects: max_objects.min(u32::MAX as usize),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an object whose narinfo a store returned; false when it was known already or
    /// the catalog is full.
    pub fn learn(&self, info: &NarInfo) -> bool {
        let mut st = self.lock();
        !self.full(&st) && st.insert(info)
    }

    /// True when `st` holds as many objects as this catalog may.
    fn full(&self, st: &State) -> bool {
        st.objects.len() >= self.max_objects
    }

    /// Objects held.
    fn len(&self) -> usize {
        self.lock().objects.len()
    }

    /// True when the catalog holds as many objects as it may.
    fn is_full(&self) -> bool {
        self.full(&self.lock())
    }

    /// Objects whose references include `digest`, as `(digest, name)` sorted by name.
    pub fn referrers(&self, digest: &str) -> Vec<(String, String)> {
        let st = self.lock();
        let Ok(digest) = Digest::parse(digest) else {
            return Vec::new();
        };
        let mut out: Vec<(&str, &Digest)> = st
            .referrers
            .get(&digest)
            .into_iter()
            .flatten()
            .filter_map(|r| st.entry(r).map(|e| (&*e.name, &e.digest)))
            .collect();
        out.sort_unstable();
        out.into_iter()
            .map(|(name, d)| (d.to_string(), name.to_owned()))
            .collect()
    }

    /// The closure summary of `digest` (as far as the catalog knows it).
    pub fn closure(&self, digest: &str) -> Option<Closure> {
        let digest = Digest::parse(digest).ok()?;
        let mut st = self.lock();
        st.ids.contains_key(&digest).then(|| st.closure(&digest))
    }

    /// A page of the index: objects whose name contains `q` (case-insensitive), ordered by
    /// `sort`, strictly after the object `after` (keyset paging, stable while objects arrive).
    pub fn page(&self, q: &str, sort: SortBy, after: Option<&str>, limit: usize) -> Page {
        let needle = Needle::new(q);
        let mut st = self.lock();
        let after = after
            .and_then(|a| Digest::parse(a).ok())
            .and_then(|d| st.ids.get(&d).copied());
        // One more than shown tells whether there is a next page.
        let take = limit.saturating_add(1);
        let (ids, matching) = match &needle {
            None => (st.walk(sort, after, take, |_| true), st.objects.len()),
            Some(n) => {
                let matching = st.names.count(n);
                let ids = if matching.saturating_mul(SPARSE) <= st.objects.len() {
                    let found = st.names.matching(n);
                    st.pick(found, sort, after, take)
                } else {
                    st.walk(sort, after, take, |name| n.matches(name))
                };
                (ids, matching)
            }
        };
        let more = ids.len() > limit;
        let rows: Vec<Row> = ids.into_iter().take(limit).map(|id| st.row(id)).collect();
        Page {
            next_after: more
                .then(|| rows.last().map(|r| r.digest.clone()))
                .flatten(),
            rows,
            matching,
            known: st.objects.len(),
            full: self.full(&st),
            listed: st.listed,
            discovering: st.discovering,
        }
    }

    /// Gauges for `/metrics`: objects held, the bound, and the bytes of the search buffer.
    pub fn render_metrics(&self) -> String {
        let st = self.lock();
        let mut s = String::new();
        for (name, help, v) in [
            (
                "nixcached_catalog_objects",
                "Objects the explorer index holds.",
                st.objects.len(),
            ),
            (
                "nixcached_catalog_max_objects",
                "Objects the explorer index may hold.",
                self.max_objects,
            ),
            (
                "nixcached_catalog_referenced",
                "Digests referred to by the objects the explorer index holds.",
                st.referrers.len(),
            ),
            (
                "nixcached_catalog_name_bytes",
                "Bytes of the explorer index's search buffer.",
                st.names.bytes(),
            ),
        ] {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
        s
    }

    /// Marks the start of a discovery pass, if one is due and none runs; false otherwise.
    fn start_pass(&self, every: Duration) -> bool {
        let mut st = self.lock();
        let due = st.last_end.is_none_or(|t| t.elapsed() >= every);
        if st.discovering || !due {
            return false;
        }
        st.discovering = true;
        true
    }

    /// Marks the end of a discovery pass; `listed` when its listing completed.
    fn end_pass(&self, listed: bool) {
        let mut st = self.lock();
        st.discovering = false;
        st.listed |= listed;
        st.last_end = Some(Instant::now());
    }

    fn forget_missing(&self) {
        self.lock().missing.clear();
    }

    fn mark_missing(&self, digest: Digest) {
        self.lock().missing.insert(digest);
    }

    /// The digests of `listed` not held yet (none when the catalog is full).
    fn unknown(&self, mut listed: Vec<Digest>) -> Vec<Digest> {
        let st = self.lock();
        if self.full(&st) {
            return Vec::new();
        }
        listed.retain(|d| !st.ids.contains_key(d));
        listed
    }

    /// References of held objects that are neither held nor known missing (none when the
    /// catalog is full: they could not be kept).
    fn unknown_references(&self) -> Vec<Digest> {
        let st = self.lock();
        if self.full(&st) {
            return Vec::new();
        }
        st.unknown_references()
    }
}

#[cfg(test)]
mod tests;
