//! Garbage collection of a binary cache (a folder, an S3 or GCS bucket), from the cache alone.
//!
//! What always stays is the closure of the roots: pinned store paths (given by the caller, and
//! the pins kept in the cache under `pins/`, one store path per line), and every narinfo
//! younger than `grace` (an uploader may be mid-closure). Of the rest, what goes is:
//!
//! - with `max_age`: what was neither written nor served (the access records `serve` keeps)
//!   within it, unless a path used within it references it;
//! - with `max_size`: besides, least recently used first, as much as it takes to bring the
//!   cache to `max_size` bytes; a path is as recently used as the most recently used path
//!   that references it, since it goes only with them;
//! - with neither: all of it.
//!
//! Removal is always closure-consistent:
//!
//! 1. narinfos, referrers first, so that no narinfo in the cache ever references a removed
//!    one. Their NAR and `.ls` files are first recorded in a tombstone (`gc/removed-…`), so a
//!    run that stops halfway loses track of nothing;
//! 2. those files in a later run, once the tombstone is older than `grace`: until then a CDN
//!    or another server may still hand out the removed narinfos, and their NARs must answer;
//! 3. NAR and `.ls` files nothing points at and no tombstone holds (an interrupted writer's),
//!    once older than `grace`.
//!
//! Just before removing, the cache is listed again: a narinfo written meanwhile keeps its
//! closure. Once the narinfos are gone it is listed a third time, and removed narinfos that a
//! narinfo written during the removal references are put back (their files are still there).
//! With `dry_run` nothing is changed and the report says what would go.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde::Serialize;

use crate::formats::narinfo::MAX_NARINFO_BYTES;
use crate::formats::{Digest, StorePath};
use crate::progress::{with, Progress};
use crate::store::binary_cache::BinaryCache;
use crate::store::blobs::{Blobs, ObjectMeta};
use crate::store::{ByteStream, Store, StoreError};

/// Where tombstones live.
const TOMBSTONES: &str = "gc/";
/// Where pins live.
const PINS: &str = "pins/";
/// Largest pin object read (a pin is a list of store paths).
const MAX_PIN_BYTES: usize = 16 << 20;

/// What to keep.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Store paths whose closures stay (besides the cache's own pins).
    pub roots: Vec<StorePath>,
    /// Keep narinfos written or served within this long, with their closures.
    pub max_age: Option<Duration>,
    /// Remove least recently used paths until the cache holds at most this many bytes
    /// (narinfos, NAR and `.ls` files, tombstones).
    pub max_size: Option<u64>,
    /// When each path was last served (from `serve`'s access records); a path missing here
    /// was last used when its narinfo was written.
    pub served: HashMap<Digest, SystemTime>,
    /// Nothing younger than this is removed, and NAR files go only this long after their
    /// narinfo did.
    pub grace: Duration,
    /// Say what would go; change nothing.
    pub dry_run: bool,
    /// Narinfos read at once (at least 1).
    pub jobs: usize,
    /// Where to count progress, for a line on a terminal.
    pub progress: Option<Arc<Progress>>,
}

/// What a collection did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Narinfos in the cache.
    pub narinfos: u64,
    /// Narinfos kept.
    pub kept: u64,
    /// Bytes in the cache when it was listed.
    pub total_bytes: u64,
    /// Bytes left once this run's removals and those waiting for the grace period are done.
    pub kept_bytes: u64,
    /// Narinfos that could not be read or parsed, left alone (`fsck` reports them).
    pub unreadable: u64,
    /// Narinfos removed, in order.
    pub removed_narinfos: Vec<String>,
    /// NAR, `.ls` and tombstone files removed.
    pub removed_files: Vec<String>,
    /// Narinfos put back because a narinfo written during the collection references them.
    pub restored: Vec<String>,
    /// NAR and `.ls` files whose removal waits for the grace period.
    pub deferred_files: u64,
    /// Bytes removed.
    pub freed_bytes: u64,
    /// Whether this was a dry run (nothing changed).
    pub dry_run: bool,
}

/// No index: a file not listed, a path not in the cache.
const NONE: u32 = u32::MAX;

/// What became of a narinfo.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Listed, not read yet.
    Listed,
    /// Read and parsed.
    Read,
    /// Could not be read or parsed: left alone (`fsck` reports it), and kept with what it
    /// might reference.
    Unreadable,
    /// Gone between the listing and the read.
    Gone,
}

/// One narinfo of the cache, compactly: a collection holds one per narinfo, so at a million
/// paths every byte here is a megabyte.
struct PathRec {
    digest: Digest,
    /// Its narinfo's size.
    size: u64,
    /// When its narinfo was written (unix seconds; `u64::MAX`: unknown, taken as now).
    written: u64,
    state: State,
    /// Its NAR file (an index into the NAR listing; `NONE` when not listed).
    nar: u32,
    /// Its `.ls` file (an index into the `.ls` listing; `NONE` when none).
    ls: u32,
    /// The paths it references that the cache has (indices; itself excluded).
    refs: Box<[u32]>,
}

/// A NAR or `.ls` file as listed.
struct FileRec {
    key: Box<str>,
    size: u64,
    modified: Option<SystemTime>,
}

fn unix(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| d.as_secs())
}

/// The files under a prefix, sorted by key for lookups by binary search.
async fn list_files(blobs: &Arc<dyn Blobs>, prefix: &str) -> Result<Vec<FileRec>, StoreError> {
    let mut files: Vec<FileRec> = blobs
        .list_meta(prefix)
        .await?
        .into_iter()
        .map(|m| FileRec {
            key: m.key.into_boxed_str(),
            size: m.size,
            modified: m.modified,
        })
        .collect();
    files.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    files.shrink_to_fit();
    Ok(files)
}

fn find(files: &[FileRec], key: &str) -> u32 {
    files
        .binary_search_by(|f| (*f.key).cmp(key))
        .map_or(NONE, |i| i as u32)
}

/// The cache's paths and their files.
struct Cache {
    /// The first listing's narinfos sorted by digest (found by binary search: a map would
    /// cost another 50 MB at a million paths), then those listed later.
    paths: Vec<PathRec>,
    sorted: usize,
    /// Where the narinfos listed later are.
    later: HashMap<Digest, u32>,
    nars: Vec<FileRec>,
    listings: Vec<FileRec>,
    /// Bytes of everything else at the top (`nix-cache-info`, logs, …).
    other_bytes: u64,
}

impl Cache {
    /// The index of the path `d`, when the cache has it.
    fn id(&self, d: &Digest) -> Option<u32> {
        match self.paths[..self.sorted].binary_search_by(|p| p.digest.cmp(d)) {
            Ok(i) => Some(i as u32),
            Err(_) => self.later.get(d).copied(),
        }
    }

    /// Adds the narinfos among `metas` not known yet; the indices added. The first call's are
    /// kept sorted by digest.
    fn add_narinfos(&mut self, metas: Vec<ObjectMeta>, count_other: bool) -> Vec<u32> {
        let first = self.paths.is_empty();
        if first {
            self.paths.reserve_exact(metas.len());
        }
        let mut added = Vec::new();
        for m in metas {
            let Some(d) = m
                .key
                .strip_suffix(".narinfo")
                .and_then(|s| Digest::parse(s).ok())
            else {
                if count_other && !m.key.ends_with(".ls") {
                    self.other_bytes += m.size;
                }
                continue;
            };
            if !first && self.id(&d).is_some() {
                continue;
            }
            let id = self.paths.len() as u32;
            if !first {
                self.later.insert(d, id);
            }
            let ls = find(&self.listings, &format!("{d}.ls"));
            self.paths.push(PathRec {
                digest: d,
                size: m.size,
                written: unix(m.modified),
                state: State::Listed,
                nar: NONE,
                ls,
                refs: Box::new([]),
            });
            added.push(id);
        }
        if first {
            self.paths.sort_unstable_by_key(|p| p.digest);
            self.sorted = self.paths.len();
            added = (0..self.sorted as u32).collect();
        }
        added
    }

    /// Reads the narinfos `ids`, `jobs` at a time.
    async fn read(
        &mut self,
        cache: &BinaryCache,
        ids: &[u32],
        jobs: usize,
        progress: &Option<Arc<Progress>>,
    ) {
        with(progress, |p| p.phase("reading narinfos", ids.len() as u64));
        let digests: Vec<(u32, Digest)> = ids
            .iter()
            .map(|i| (*i, self.paths[*i as usize].digest))
            .collect();
        let mut results = futures::stream::iter(digests)
            .map(|(id, d)| async move { (id, cache.narinfo(&d).await) })
            .buffer_unordered(jobs.max(1));
        while let Some((id, r)) = results.next().await {
            with(progress, Progress::step);
            let (state, nar, refs) = match r {
                Ok(info) => {
                    let me = self.paths[id as usize].digest;
                    let refs: Box<[u32]> = info
                        .references
                        .iter()
                        .filter(|r| *r.digest() != me)
                        .filter_map(|r| self.id(r.digest()))
                        .collect();
                    (State::Read, find(&self.nars, &info.url), refs)
                }
                Err(StoreError::NotFound(_)) => (State::Gone, NONE, Box::default()),
                Err(_) => (State::Unreadable, NONE, Box::default()),
            };
            let p = &mut self.paths[id as usize];
            (p.state, p.nar, p.refs) = (state, nar, refs);
        }
    }

    /// Bytes of path `id`: its narinfo, NAR and `.ls`.
    fn bytes(&self, id: u32) -> u64 {
        let p = &self.paths[id as usize];
        let file = |files: &[FileRec], i: u32| files.get(i as usize).map_or(0, |f| f.size);
        p.size + file(&self.nars, p.nar) + file(&self.listings, p.ls)
    }

    /// Every path reachable from `roots` through references, the roots included.
    fn closure(&self, kept: &mut [bool], roots: impl IntoIterator<Item = u32>) {
        let mut todo: Vec<u32> = roots.into_iter().collect();
        while let Some(id) = todo.pop() {
            if !std::mem::replace(&mut kept[id as usize], true) {
                todo.extend(self.paths[id as usize].refs.iter().copied());
            }
        }
    }

    /// The files of path `id` that are listed: its NAR and its `.ls`.
    fn files(&self, id: u32) -> impl Iterator<Item = &str> {
        let p = &self.paths[id as usize];
        let nar = self.nars.get(p.nar as usize).map(|f| &*f.key);
        let ls = self.listings.get(p.ls as usize).map(|f| &*f.key);
        nar.into_iter().chain(ls)
    }
}

/// Collects the cache in `blobs`.
pub async fn gc(blobs: Arc<dyn Blobs>, opts: &GcOptions) -> Result<GcReport, StoreError> {
    let now = SystemTime::now();
    let now_secs = unix(Some(now)).min(u64::MAX - 1);
    let age_secs = |written: u64| now_secs.saturating_sub(written.min(now_secs));
    let age = |m: Option<SystemTime>| {
        m.and_then(|t| now.duration_since(t).ok())
            .unwrap_or(Duration::ZERO)
    };
    let grace = opts.grace.as_secs();
    let bc = BinaryCache::new(blobs.clone());
    with(&opts.progress, |p| p.phase("listing", 0));

    // The listings, kept compact: NAR and `.ls` files sorted by key, one record per narinfo.
    let nars = list_files(&blobs, "nar/").await?;
    let top = blobs.list_meta("").await?;
    let mut listings: Vec<FileRec> = top
        .iter()
        .filter(|m| m.key.ends_with(".ls"))
        .map(|m| FileRec {
            key: m.key.as_str().into(),
            size: m.size,
            modified: m.modified,
        })
        .collect();
    listings.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    let tombstones = blobs.list_meta(TOMBSTONES).await?;
    let mut c = Cache {
        paths: Vec::new(),
        sorted: 0,
        later: HashMap::new(),
        nars,
        listings,
        other_bytes: 0,
    };
    let first = c.add_narinfos(top, true);
    c.paths.shrink_to_fit();
    let listed = c.paths.len();
    let mut report = GcReport {
        narinfos: listed as u64,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    report.total_bytes = c.paths.iter().map(|p| p.size).sum::<u64>()
        + c.nars.iter().map(|f| f.size).sum::<u64>()
        + c.listings.iter().map(|f| f.size).sum::<u64>()
        + tombstones.iter().map(|t| t.size).sum::<u64>()
        + c.other_bytes;
    c.read(&bc, &first, opts.jobs, &opts.progress).await;

    // Roots: pins, fresh narinfos, and what cannot be read (left to fsck).
    let mut roots: Vec<u32> = opts
        .roots
        .iter()
        .map(|p| *p.digest())
        .chain(pinned(&blobs).await?)
        .filter_map(|d| c.id(&d))
        .collect();
    roots.extend(
        c.paths
            .iter()
            .enumerate()
            .filter(|(_, p)| age_secs(p.written) < grace || p.state == State::Unreadable)
            .map(|(i, _)| i as u32),
    );

    // Listed again just before deciding: what was written meanwhile is a root too.
    let fresh = c.add_narinfos(blobs.list_meta("").await?, false);
    if !fresh.is_empty() {
        c.read(&bc, &fresh, opts.jobs, &opts.progress).await;
        roots.extend(&fresh);
    }
    let n = c.paths.len();
    report.unreadable = c
        .paths
        .iter()
        .filter(|p| p.state == State::Unreadable)
        .count() as u64;
    let mut kept = vec![false; n];
    c.closure(&mut kept, roots);

    // When each path was last used: written or served, whichever is later.
    let last_use: Vec<u64> = c
        .paths
        .iter()
        .map(|p| {
            let written = p.written.min(now_secs);
            opts.served
                .get(&p.digest)
                .map_or(written, |s| written.max(unix(Some(*s)).min(now_secs)))
        })
        .collect();
    let present = |i: usize| c.paths[i].state == State::Read;

    // Tombstones, read first: their files are on their way out whatever this run decides.
    let mut stones: Vec<(&ObjectMeta, Vec<String>)> = Vec::with_capacity(tombstones.len());
    for t in &tombstones {
        stones.push((t, tombstone_keys(&bc, &t.key).await?));
    }
    let pending: HashSet<&str> = stones
        .iter()
        .filter(|(t, _)| age(t.modified) < opts.grace)
        .flat_map(|(_, keys)| keys.iter().map(String::as_str))
        .collect();
    // Files nothing points at and no tombstone holds: an interrupted writer's. While a
    // narinfo cannot be read, which NAR is its cannot be told, so no NAR counts as an orphan
    // (fsck --repair writes such a path again or removes it).
    if report.unreadable > 0 {
        tracing::warn!(
            "{} narinfos cannot be read: no NAR file is taken for an orphan this run (`nixcached fsck --repair` deals with them)",
            report.unreadable
        );
    }
    let mut nar_pointed = vec![report.unreadable > 0; c.nars.len()];
    for p in c.paths.iter().filter(|p| p.nar != NONE) {
        nar_pointed[p.nar as usize] = true;
    }
    let orphans: Vec<&str> = c
        .nars
        .iter()
        .zip(&nar_pointed)
        .filter(|(_, pointed)| !**pointed)
        .map(|(f, _)| f)
        .chain(c.listings.iter().filter(|f| {
            let d = f
                .key
                .strip_suffix(".ls")
                .and_then(|d| Digest::parse(d).ok());
            !d.and_then(|d| c.id(&d))
                .is_some_and(|i| c.paths[i as usize].state != State::Gone)
        }))
        .filter(|f| !pending.contains(&*f.key) && age(f.modified) >= opts.grace)
        .map(|f| &*f.key)
        .collect();
    drop(nar_pointed);

    let mut doomed = vec![false; n];
    if opts.max_age.is_some() || opts.max_size.is_none() {
        let mut recent = vec![false; n];
        if let Some(max) = opts.max_age {
            let max = max.as_secs();
            let used = (0..n).filter(|i| age_secs(last_use[*i]) < max);
            c.closure(&mut recent, used.map(|i| i as u32));
        }
        for i in 0..n {
            doomed[i] = present(i) && !kept[i] && !recent[i];
        }
    }
    // The size of a NAR, `.ls` or tombstone file as listed (0 when it was not).
    let size_of_file = |k: &str| -> u64 {
        let of = |files: &[FileRec]| files.get(find(files, k) as usize).map(|f| f.size);
        of(&c.nars)
            .or_else(|| of(&c.listings))
            .or_else(|| tombstones.iter().find(|t| t.key == k).map(|t| t.size))
            .unwrap_or(0)
    };
    if let Some(max_size) = opts.max_size {
        // What stays once what is on its way out is gone.
        let leaving: HashSet<&str> = stones
            .iter()
            .flat_map(|(t, keys)| keys.iter().map(String::as_str).chain([t.key.as_str()]))
            .chain(orphans.iter().copied())
            .collect();
        let mut left = report
            .total_bytes
            .saturating_sub(leaving.iter().map(|k| size_of_file(k)).sum::<u64>());
        for i in (0..n).filter(|i| doomed[*i]) {
            left = left.saturating_sub(c.bytes(i as u32));
        }
        if left > max_size {
            let candidate: Vec<bool> = (0..n)
                .map(|i| present(i) && !kept[i] && !doomed[i])
                .collect();
            let refs: Vec<&[u32]> = c.paths.iter().map(|p| &*p.refs).collect();
            let more = least_recently_used(
                &refs,
                &candidate,
                &last_use,
                |i| c.bytes(i),
                left - max_size,
            );
            for (i, m) in more.into_iter().enumerate() {
                doomed[i] |= m;
            }
        }
    }
    report.kept = (0..listed).filter(|i| !doomed[*i]).count() as u64;

    // Files pointed at by a narinfo that stays.
    let mut live_nar = vec![false; c.nars.len()];
    for (i, p) in c.paths.iter().enumerate() {
        if p.nar != NONE && !doomed[i] {
            live_nar[p.nar as usize] = true;
        }
    }
    let is_live = |key: &str| -> bool {
        match key.strip_suffix(".ls").map(Digest::parse) {
            Some(Ok(d)) => c.id(&d).is_some_and(|i| {
                let i = i as usize;
                c.paths[i].state != State::Gone && !doomed[i]
            }),
            _ => {
                let i = find(&c.nars, key);
                i != NONE && live_nar[i as usize]
            }
        }
    };

    // Tombstones past the grace period: their files go (unless pointed at again), then they.
    let mut remove_now: Vec<String> = orphans.iter().map(|k| k.to_string()).collect();
    for (t, keys) in &stones {
        if age(t.modified) >= opts.grace {
            remove_now.extend(keys.iter().filter(|k| !is_live(k)).cloned());
            remove_now.push(t.key.clone());
        }
    }
    report.deferred_files += pending.len() as u64;
    remove_now.sort();
    remove_now.dedup();

    // The doomed narinfos' files, recorded before the narinfos go.
    let doomed_ids: Vec<u32> = (0..n as u32).filter(|i| doomed[*i as usize]).collect();
    let mut doomed_files: Vec<String> = doomed_ids
        .iter()
        .flat_map(|i| c.files(*i))
        .filter(|k| !is_live(k))
        .map(str::to_owned)
        .collect();
    doomed_files.sort();
    doomed_files.dedup();

    // What the cache holds once this run and the grace periods are over.
    let doomed_bytes: u64 = doomed_ids.iter().map(|i| c.paths[*i as usize].size).sum();
    let leaving: HashSet<&str> = remove_now
        .iter()
        .chain(&doomed_files)
        .map(String::as_str)
        .chain(pending.iter().copied())
        .chain(stones.iter().map(|(t, _)| t.key.as_str()))
        .collect();
    report.kept_bytes = report
        .total_bytes
        .saturating_sub(doomed_bytes + leaving.iter().map(|k| size_of_file(k)).sum::<u64>());
    drop(leaving);

    if opts.dry_run {
        let mut doomed_keys: Vec<String> = doomed_ids
            .iter()
            .map(|i| format!("{}.narinfo", c.paths[*i as usize].digest))
            .collect();
        doomed_keys.sort();
        report.freed_bytes = doomed_bytes + remove_now.iter().map(|k| size_of_file(k)).sum::<u64>();
        report.removed_narinfos = doomed_keys;
        report.removed_files = remove_now;
        report.deferred_files += doomed_files.len() as u64;
        return Ok(report);
    }

    for key in &remove_now {
        blobs.delete(key).await?;
        report.freed_bytes += size_of_file(key);
        report.removed_files.push(key.clone());
    }
    if !doomed_ids.is_empty() {
        let stamp = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let text = doomed_files.join("\n") + "\n";
        let stream: ByteStream = Box::pin(futures::stream::once(async move {
            Ok(bytes::Bytes::from(text))
        }));
        blobs
            .put(
                &format!("{TOMBSTONES}removed-{stamp}"),
                stream,
                "text/plain",
            )
            .await?;
        report.deferred_files += doomed_files.len() as u64;
        drop(doomed_files);
        // Their texts, to put back what a writer references after all (below). Read again
        // rather than kept from the first read, and kept in a temporary file: at a million
        // paths they would not fit in memory.
        let mut saved = Saved::new()?;
        with(&opts.progress, |p| {
            p.phase("saving removed narinfos", doomed_ids.len() as u64)
        });
        let mut texts = futures::stream::iter(doomed_ids.iter().copied())
            .map(|i| {
                let bc = &bc;
                let d = c.paths[i as usize].digest;
                async move {
                    (
                        d,
                        bc.read_small(&format!("{d}.narinfo"), MAX_NARINFO_BYTES)
                            .await,
                    )
                }
            })
            .buffer_unordered(opts.jobs.max(1));
        while let Some((d, r)) = texts.next().await {
            with(&opts.progress, Progress::step);
            match r {
                Ok(text) => saved.put(d, &text)?,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        drop(texts);
        report.removed_narinfos =
            remove_referrers_first(&blobs, &c, &doomed, &doomed_ids, opts).await?;
        report.freed_bytes += doomed_bytes;
        let known = |d: &Digest| c.id(d).is_some();
        let refs_of = |d: &Digest| -> Vec<Digest> {
            c.id(d).map_or_else(Vec::new, |i| {
                c.paths[i as usize]
                    .refs
                    .iter()
                    .filter(|r| doomed[**r as usize])
                    .map(|r| c.paths[*r as usize].digest)
                    .collect()
            })
        };
        report.restored = restore_referenced(&blobs, &bc, &known, &saved, &refs_of, opts).await?;
    }
    Ok(report)
}

/// Narinfo texts kept in an unlinked temporary file, by digest.
struct Saved {
    file: std::fs::File,
    len: u64,
    at: HashMap<Digest, (u64, u32)>,
}

impl Saved {
    fn new() -> Result<Saved, StoreError> {
        let file = tempfile::tempfile().map_err(|e| {
            StoreError::Unavailable(format!(
                "creating a temporary file for the removed narinfos: {e}; set TMPDIR to a writable folder"
            ))
        })?;
        Ok(Saved {
            file,
            len: 0,
            at: HashMap::new(),
        })
    }

    fn put(&mut self, d: Digest, text: &str) -> Result<(), StoreError> {
        use std::io::Write;
        self.file.write_all(text.as_bytes()).map_err(|e| {
            StoreError::Unavailable(format!("keeping removed narinfos in a temporary file: {e}"))
        })?;
        self.at.insert(d, (self.len, text.len() as u32));
        self.len += text.len() as u64;
        Ok(())
    }

    fn has(&self, d: &Digest) -> bool {
        self.at.contains_key(d)
    }

    fn get(&self, d: &Digest) -> Result<String, StoreError> {
        use std::os::unix::fs::FileExt;
        let (at, len) = self.at[d];
        let mut buf = vec![0; len as usize];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| StoreError::Unavailable(format!("reading a removed narinfo back: {e}")))?;
        String::from_utf8(buf).map_err(|_| StoreError::Corrupt(format!("{d}.narinfo")))
    }
}

/// Removes the narinfos of the `doomed` paths, each once no doomed path that references it is
/// left, so that no narinfo in the cache ever references a removed one; those with no doomed
/// referrer left go together, `jobs` at a time. The keys removed, in order.
async fn remove_referrers_first(
    blobs: &Arc<dyn Blobs>,
    c: &Cache,
    doomed: &[bool],
    doomed_ids: &[u32],
    opts: &GcOptions,
) -> Result<Vec<String>, StoreError> {
    let mut referrers_left = vec![0u32; c.paths.len()];
    for i in doomed_ids {
        for r in c.paths[*i as usize].refs.iter() {
            if doomed[*r as usize] {
                referrers_left[*r as usize] += 1;
            }
        }
    }
    let mut ready: Vec<u32> = doomed_ids
        .iter()
        .copied()
        .filter(|i| referrers_left[*i as usize] == 0)
        .collect();
    let mut gone = vec![false; c.paths.len()];
    let mut removed = Vec::with_capacity(doomed_ids.len());
    with(&opts.progress, |p| {
        p.phase("removing narinfos", doomed_ids.len() as u64)
    });
    while removed.len() < doomed_ids.len() {
        if ready.is_empty() {
            // A reference cycle (Nix makes none besides self-references): the rest at once.
            ready = doomed_ids
                .iter()
                .copied()
                .filter(|i| !gone[*i as usize])
                .collect();
        }
        let batch = std::mem::take(&mut ready);
        let keys: Vec<String> = batch
            .iter()
            .map(|i| format!("{}.narinfo", c.paths[*i as usize].digest))
            .collect();
        let mut deletes = futures::stream::iter(keys.iter())
            .map(|k| async move { blobs.delete(k).await })
            .buffer_unordered(opts.jobs.max(1));
        while let Some(r) = deletes.next().await {
            r?;
            with(&opts.progress, Progress::step);
        }
        drop(deletes);
        for i in &batch {
            gone[*i as usize] = true;
        }
        for i in &batch {
            for r in c.paths[*i as usize].refs.iter() {
                let r = *r as usize;
                if doomed[r] && !gone[r] {
                    referrers_left[r] = referrers_left[r].saturating_sub(1);
                    if referrers_left[r] == 0 {
                        ready.push(r as u32);
                    }
                }
            }
        }
        tracing::debug!("removed {} narinfos", keys.len());
        removed.extend(keys);
    }
    Ok(removed)
}

/// After removing: a narinfo written since the last listing may reference a removed path
/// (its uploader found it present moments before). Those removed narinfos, and what they
/// reference among the removed, are put back, references first; their files are still there,
/// since files go only a grace period after their narinfo.
async fn restore_referenced(
    blobs: &Arc<dyn Blobs>,
    cache: &BinaryCache,
    known: &dyn Fn(&Digest) -> bool,
    saved: &Saved,
    refs_of: &dyn Fn(&Digest) -> Vec<Digest>,
    opts: &GcOptions,
) -> Result<Vec<String>, StoreError> {
    let now: Vec<Digest> = blobs
        .list_meta("")
        .await?
        .iter()
        .filter_map(|m| Digest::parse(m.key.strip_suffix(".narinfo")?).ok())
        .filter(|d| !known(d))
        .collect();
    if now.is_empty() {
        return Ok(Vec::new());
    }
    // Removed paths the new narinfos need, with their removed references.
    let mut todo: Vec<Digest> = futures::stream::iter(now)
        .map(|d| async move { cache.narinfo(&d).await })
        .buffer_unordered(opts.jobs.max(1))
        .filter_map(|r| async move { r.ok() })
        .flat_map(|info| {
            futures::stream::iter(
                info.references
                    .iter()
                    .map(|r| *r.digest())
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|d| futures::future::ready(saved.has(d)))
        .collect()
        .await;
    let mut needed = HashSet::new();
    while let Some(d) = todo.pop() {
        if needed.insert(d) {
            todo.extend(refs_of(&d).into_iter().filter(|r| saved.has(r)));
        }
    }
    // References first: a narinfo goes back once everything it references is back.
    let mut restored = Vec::new();
    let mut back = HashSet::new();
    while back.len() < needed.len() {
        let mut progress = false;
        let mut ready: Vec<Digest> = needed
            .iter()
            .filter(|d| !back.contains(*d))
            .filter(|d| {
                refs_of(d)
                    .iter()
                    .all(|r| r == *d || !needed.contains(r) || back.contains(r))
            })
            .copied()
            .collect();
        ready.sort();
        for d in ready {
            let key = format!("{d}.narinfo");
            let text = saved.get(&d)?;
            let stream: ByteStream = Box::pin(futures::stream::once(async move {
                Ok(bytes::Bytes::from(text))
            }));
            blobs.put(&key, stream, "text/x-nix-narinfo").await?;
            tracing::info!("put back {key}: a narinfo written during the collection references it");
            restored.push(key);
            back.insert(d);
            progress = true;
        }
        if !progress {
            break; // a cycle among them; Nix makes none
        }
    }
    Ok(restored)
}

/// The least recently used of the `candidate` paths, enough of them to free `wanted` bytes
/// (or all there are), closed under referrers: a path goes only with every candidate that
/// references it.
///
/// A path counts as used when the most recently used candidate whose closure holds it was, so
/// taking paths in that order takes referrers no later than what they reference.
fn least_recently_used(
    refs: &[&[u32]],
    candidate: &[bool],
    last_use: &[u64],
    bytes: impl Fn(u32) -> u64,
    wanted: u64,
) -> Vec<bool> {
    let n = refs.len();
    // Most recent first; each path's effective use is the first time a walk reaches it.
    let mut by_use: Vec<u32> = (0..n as u32).filter(|i| candidate[*i as usize]).collect();
    by_use.sort_unstable_by_key(|i| std::cmp::Reverse(last_use[*i as usize]));
    const UNSEEN: u64 = u64::MAX;
    let mut effective = vec![UNSEEN; n];
    let mut todo = Vec::new();
    for root in &by_use {
        let t = last_use[*root as usize];
        todo.push(*root);
        while let Some(i) = todo.pop() {
            let i = i as usize;
            if !candidate[i] || effective[i] != UNSEEN {
                continue;
            }
            effective[i] = t;
            todo.extend(refs[i].iter().copied());
        }
    }
    // Least recent first; the prefix that frees enough, then its referrers.
    by_use.sort_unstable_by_key(|i| (effective[*i as usize], *i));
    let mut chosen = vec![false; n];
    let mut freed = 0u64;
    for i in &by_use {
        if freed >= wanted {
            break;
        }
        freed += bytes(*i);
        chosen[*i as usize] = true;
    }
    // Referrers among the candidates, as one flat table (offsets, then the referrers).
    let mut start = vec![0u32; n + 1];
    for (i, r) in refs.iter().enumerate().filter(|(i, _)| candidate[*i]) {
        for to in r.iter().filter(|to| **to as usize != i) {
            start[*to as usize + 1] += 1;
        }
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut referrers = vec![0u32; start[n] as usize];
    for (i, r) in refs.iter().enumerate().filter(|(i, _)| candidate[*i]) {
        for to in r.iter().filter(|to| **to as usize != i) {
            referrers[fill[*to as usize] as usize] = i as u32;
            fill[*to as usize] += 1;
        }
    }
    let mut todo: Vec<u32> = (0..n as u32).filter(|i| chosen[*i as usize]).collect();
    while let Some(i) = todo.pop() {
        let i = i as usize;
        for r in &referrers[start[i] as usize..start[i + 1] as usize] {
            if !std::mem::replace(&mut chosen[*r as usize], true) {
                todo.push(*r);
            }
        }
    }
    chosen
}

/// The store paths pinned in the cache (`pins/NAME`: one store path per line).
async fn pinned(blobs: &Arc<dyn Blobs>) -> Result<Vec<Digest>, StoreError> {
    let cache = BinaryCache::new(blobs.clone());
    let mut out = Vec::new();
    for m in blobs.list_meta(PINS).await? {
        let text = cache.read_small(&m.key, MAX_PIN_BYTES).await?;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            // `/nix/store/…-name` or the base name alone; the digest is what counts.
            let base = line.rsplit('/').next().unwrap_or(line);
            let path = StorePath::from_base_name(base).map_err(|e| {
                StoreError::Corrupt(format!("{}: {line:?} is not a store path: {e}", m.key))
            })?;
            out.push(*path.digest());
        }
    }
    Ok(out)
}

/// The keys a tombstone lists.
async fn tombstone_keys(cache: &BinaryCache, key: &str) -> Result<Vec<String>, StoreError> {
    Ok(cache
        .read_small(key, MAX_PIN_BYTES)
        .await?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Whether `name` may name a pin: one plain path segment.
fn check_pin_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "pin name {name:?}: use letters, digits, '.', '_' and '-' (not first)"
        )))
    }
}

/// Pins `paths` under `name` (replacing what `name` pinned).
pub async fn pin_add(
    blobs: &Arc<dyn Blobs>,
    name: &str,
    paths: &[StorePath],
) -> Result<(), StoreError> {
    check_pin_name(name)?;
    let text: String = paths.iter().map(|p| format!("/nix/store/{p}\n")).collect();
    let stream: ByteStream = Box::pin(futures::stream::once(async move {
        Ok(bytes::Bytes::from(text))
    }));
    blobs
        .put(&format!("{PINS}{name}"), stream, "text/plain")
        .await?;
    Ok(())
}

/// Removes the pin `name` (not an error when there is none).
pub async fn pin_rm(blobs: &Arc<dyn Blobs>, name: &str) -> Result<(), StoreError> {
    check_pin_name(name)?;
    blobs.delete(&format!("{PINS}{name}")).await
}

/// Every pin and the store paths (as written) it holds.
pub async fn pin_ls(blobs: &Arc<dyn Blobs>) -> Result<Vec<(String, Vec<String>)>, StoreError> {
    let cache = BinaryCache::new(blobs.clone());
    let mut out = Vec::new();
    for m in blobs.list_meta(PINS).await? {
        let text = cache.read_small(&m.key, MAX_PIN_BYTES).await?;
        let name = m.key.strip_prefix(PINS).unwrap_or(&m.key).to_owned();
        out.push((
            name,
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        ));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryBlobs;
    use crate::store::{Blob, ByteRange};
    use std::sync::atomic::{AtomicBool, Ordering};

    const Q: &str = "5r1dlyl2wyar1nn50ry8xi6apps79m0j";
    const P: &str = "6r1dlyl2wyar1nn50ry8xi6apps79m0j";
    const X: &str = "7r1dlyl2wyar1nn50ry8xi6apps79m0j";

    fn narinfo(digest: &str, refs: &str) -> String {
        format!(
            "StorePath: /nix/store/{digest}-x\nURL: nar/{digest}.nar\nCompression: none\n\
             NarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\n\
             NarSize: 1240\nReferences: {refs}\n"
        )
    }

    fn text(t: String) -> ByteStream {
        Box::pin(futures::stream::once(
            async move { Ok(bytes::Bytes::from(t)) },
        ))
    }

    /// Least recently used goes first, a path counts as used when a referrer was, and what
    /// goes is closed under referrers; kept paths never go.
    #[test]
    fn least_recently_used_takes_referrers_with_what_they_reference() {
        let pick = |refs: &[&[u32]], kept: &[u32], uses: &[u64], wanted: u64| -> Vec<u32> {
            let candidate: Vec<bool> = (0..refs.len() as u32).map(|i| !kept.contains(&i)).collect();
            let chosen = least_recently_used(refs, &candidate, uses, |_| 1, wanted);
            (0..refs.len() as u32)
                .filter(|i| chosen[*i as usize])
                .collect()
        };
        // 0 → 1 → 2, and 3 alone; 2 used recently, 0 and 1 long ago.
        let refs: [&[u32]; 4] = [&[1], &[2], &[], &[]];
        let uses = [1, 2, 10, 5];
        assert_eq!(pick(&refs, &[], &uses, 1), [0]);
        assert_eq!(pick(&refs, &[], &uses, 2), [0, 1]);
        assert_eq!(pick(&refs, &[], &uses, 3), [0, 1, 3]);
        assert_eq!(pick(&refs, &[], &uses, 99), [0, 1, 2, 3]);
        // 1 kept (with its closure, 2): only 0 and 3 may go.
        assert_eq!(pick(&refs, &[1, 2], &uses, 99), [0, 3]);

        // A recent referrer makes what it references recent: 0 (used at 10) → 1 (used at 1).
        let refs: [&[u32]; 3] = [&[1], &[], &[]];
        let uses = [10, 1, 5];
        assert_eq!(pick(&refs, &[], &uses, 1), [2]);
        // Asked for 2: 2, then the referrer 0 (as recent as 1, taken first) may go alone.
        assert_eq!(pick(&refs, &[], &uses, 2), [0, 2]);
        // Where the referenced path comes first among equals, its referrer goes with it.
        let refs: [&[u32]; 3] = [&[], &[0], &[]];
        let uses = [1, 10, 5];
        assert_eq!(pick(&refs, &[], &uses, 2), [0, 1, 2]);
    }

    /// When an uploader lands P (which references the old Q) in the cache.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum When {
        /// While the collection reads the narinfos (before its second listing).
        Reading,
        /// While it removes narinfos (after its last look before removing).
        Removing,
    }

    /// A cache where an uploader writes P's NAR and narinfo at the moment `when` says.
    struct Racing {
        inner: MemoryBlobs,
        when: When,
        fired: AtomicBool,
    }

    impl Racing {
        async fn upload_p(&self) {
            if !self.fired.swap(true, Ordering::SeqCst) {
                let nar = format!("nar/{P}.nar");
                self.inner.put(&nar, text("nar".into()), "").await.unwrap();
                let ni = narinfo(P, &format!("{Q}-x"));
                self.inner
                    .put(&format!("{P}.narinfo"), text(ni), "")
                    .await
                    .unwrap();
            }
        }
    }

    #[async_trait::async_trait]
    impl Blobs for Racing {
        fn describe(&self) -> String {
            "racing".into()
        }
        async fn get(&self, key: &str, range: Option<ByteRange>) -> crate::store::Result<Blob> {
            if self.when == When::Reading && key.ends_with(".narinfo") {
                self.upload_p().await;
            }
            self.inner.get(key, range).await
        }
        async fn put(&self, key: &str, data: ByteStream, ct: &str) -> crate::store::Result<u64> {
            self.inner.put(key, data, ct).await
        }
        async fn head(&self, key: &str) -> crate::store::Result<Option<u64>> {
            self.inner.head(key).await
        }
        async fn list_meta(&self, prefix: &str) -> crate::store::Result<Vec<ObjectMeta>> {
            self.inner.list_meta(prefix).await
        }
        async fn delete(&self, key: &str) -> crate::store::Result<()> {
            let r = self.inner.delete(key).await;
            if self.when == When::Removing && key.ends_with(".narinfo") {
                self.upload_p().await;
            }
            r
        }
    }

    /// An upload that references an old path and lands mid-collection never leaves its
    /// narinfo without the old path's: landing before the last look, the old path is kept;
    /// landing while narinfos are removed, the old path's narinfo is put back.
    #[tokio::test]
    async fn an_upload_landing_mid_collection_keeps_what_it_references() {
        for when in [When::Reading, When::Removing] {
            let blobs = Arc::new(Racing {
                inner: MemoryBlobs::new(),
                when,
                fired: AtomicBool::new(false),
            });
            for (d, refs) in [(Q, ""), (X, "")] {
                blobs
                    .inner
                    .put(&format!("nar/{d}.nar"), text("nar".into()), "")
                    .await
                    .unwrap();
                blobs
                    .inner
                    .put(&format!("{d}.narinfo"), text(narinfo(d, refs)), "")
                    .await
                    .unwrap();
            }
            let opts = GcOptions {
                roots: Vec::new(),
                max_age: None,
                max_size: None,
                served: HashMap::new(),
                grace: Duration::ZERO,
                dry_run: false,
                jobs: 1,
                progress: None,
            };
            let dyn_blobs: Arc<dyn Blobs> = blobs.clone();
            let report = gc(dyn_blobs, &opts).await.unwrap();
            assert!(
                blobs.fired.load(Ordering::SeqCst),
                "{when:?}: P was never written"
            );
            let q = format!("{Q}.narinfo");
            assert!(
                blobs.inner.head(&q).await.unwrap().is_some(),
                "{when:?}: Q's narinfo is gone while P references it: {report:?}"
            );
            assert!(
                blobs
                    .inner
                    .head(&format!("{X}.narinfo"))
                    .await
                    .unwrap()
                    .is_none(),
                "{when:?}: X should go: {report:?}"
            );
            match when {
                When::Reading => {
                    assert!(!report.removed_narinfos.contains(&q), "{report:?}");
                    assert!(report.restored.is_empty(), "{report:?}");
                }
                When::Removing => assert_eq!(report.restored, [q], "{report:?}"),
            }
        }
    }
}
