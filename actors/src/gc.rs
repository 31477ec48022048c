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
use crate::fsck::{referrers_of, remove_referrers_first};
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

/// One narinfo as read: what it references and its NAR file (its `.ls` is named for its
/// digest). Kept small, since a collection holds one per narinfo in the cache.
struct Read {
    refs: Box<[Digest]>,
    nar: Box<str>,
}

impl Read {
    /// The files that belong to the path `d`: its NAR and its `.ls`.
    fn files(&self, d: &Digest) -> [String; 2] {
        [self.nar.to_string(), format!("{d}.ls")]
    }
}

/// Collects the cache in `blobs`.
pub async fn gc(blobs: Arc<dyn Blobs>, opts: &GcOptions) -> Result<GcReport, StoreError> {
    let now = SystemTime::now();
    let age = |m: &ObjectMeta| {
        m.modified
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or(Duration::ZERO)
    };
    let cache = BinaryCache::new(blobs.clone());
    let top = blobs.list_meta("").await?;
    let nar_files = blobs.list_meta("nar/").await?;
    let tombstones = blobs.list_meta(TOMBSTONES).await?;
    // Borrowed keys: at a million objects a second copy of every key would cost ~100 MB.
    let sizes: HashMap<&str, u64> = top
        .iter()
        .chain(&nar_files)
        .chain(&tombstones)
        .map(|m| (m.key.as_str(), m.size))
        .collect();

    let narinfos: Vec<(Digest, &ObjectMeta)> = top
        .iter()
        .filter_map(|m| {
            let d = Digest::parse(m.key.strip_suffix(".narinfo")?).ok()?;
            Some((d, m))
        })
        .collect();
    let mut report = GcReport {
        narinfos: narinfos.len() as u64,
        total_bytes: sizes.values().sum(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let (mut read, unreadable) = read_all(&cache, narinfos.iter().map(|(d, _)| *d), opts).await;
    report.unreadable = unreadable.len() as u64;

    // Roots: pins, fresh narinfos, and what cannot be read (left to fsck).
    let mut roots: Vec<Digest> = opts.roots.iter().map(|p| *p.digest()).collect();
    roots.extend(pinned(&blobs).await?);
    roots.extend(
        narinfos
            .iter()
            .filter(|(_, m)| age(m) < opts.grace)
            .map(|(d, _)| *d),
    );
    roots.extend(unreadable.iter().copied());
    let mut kept = closure(&read, roots);

    // Listed again just before deciding: what was written meanwhile keeps its closure.
    let again = blobs.list_meta("").await?;
    let fresh: Vec<Digest> = again
        .iter()
        .filter_map(|m| Digest::parse(m.key.strip_suffix(".narinfo")?).ok())
        .filter(|d| !read.contains_key(d) && !unreadable.contains(d))
        .collect();
    drop(again);
    if !fresh.is_empty() {
        let (more, more_unreadable) = read_all(&cache, fresh.iter().copied(), opts).await;
        read.extend(more);
        let extra: Vec<Digest> = fresh.into_iter().chain(more_unreadable).collect();
        let more_kept = closure(&read, extra.into_iter().chain(kept.iter().copied()));
        kept.extend(more_kept);
    }

    // When each path was last used: written or served, whichever is later.
    let last_use: HashMap<Digest, SystemTime> = narinfos
        .iter()
        .map(|(d, m)| {
            let written = m.modified.unwrap_or(now);
            let used = opts.served.get(d).map_or(written, |s| written.max(*s));
            (*d, used)
        })
        .collect();
    // Tombstones, read first: their files are on their way out whatever this run decides.
    let mut stones: Vec<(&ObjectMeta, Vec<String>)> = Vec::with_capacity(tombstones.len());
    for t in &tombstones {
        stones.push((t, tombstone_keys(&cache, &t.key).await?));
    }
    let pending: HashSet<&str> = stones
        .iter()
        .filter(|(t, _)| age(t) < opts.grace)
        .flat_map(|(_, keys)| keys.iter().map(String::as_str))
        .collect();
    // Files nothing points at and no tombstone holds: an interrupted writer's.
    let pointed_files: HashSet<&str> = read.values().map(|r| &*r.nar).collect();
    let orphans: Vec<&str> = nar_files
        .iter()
        .chain(top.iter().filter(|m| m.key.ends_with(".ls")))
        .filter(|m| {
            let pointed = match m.key.strip_suffix(".ls") {
                Some(d) => Digest::parse(d).is_ok_and(|d| read.contains_key(&d)),
                None => pointed_files.contains(m.key.as_str()),
            };
            !pointed && !pending.contains(m.key.as_str()) && age(m) >= opts.grace
        })
        .map(|m| m.key.as_str())
        .collect();

    let mut doomed: HashSet<Digest> = HashSet::new();
    if opts.max_age.is_some() || opts.max_size.is_none() {
        let recent = opts.max_age.map_or_else(HashSet::new, |max| {
            closure(
                &read,
                last_use
                    .iter()
                    .filter(|(_, t)| now.duration_since(**t).unwrap_or(Duration::ZERO) < max)
                    .map(|(d, _)| *d),
            )
        });
        doomed.extend(
            read.keys()
                .filter(|d| !kept.contains(*d) && !recent.contains(*d))
                .copied(),
        );
    }
    let path_bytes = |d: &Digest| -> u64 {
        let narinfo = format!("{d}.narinfo");
        [narinfo.as_str(), &read[d].nar, &format!("{d}.ls")]
            .iter()
            .filter_map(|k| sizes.get(k))
            .sum()
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
            .saturating_sub(leaving.iter().filter_map(|k| sizes.get(k)).sum::<u64>());
        for d in &doomed {
            left = left.saturating_sub(path_bytes(d));
        }
        if left > max_size {
            let more = least_recently_used(
                &read,
                &kept,
                &doomed,
                &last_use,
                path_bytes,
                left - max_size,
            );
            doomed.extend(more);
        }
    }
    report.kept = narinfos.iter().filter(|(d, _)| !doomed.contains(d)).count() as u64;

    // NAR files still pointed at by a narinfo that stays.
    let live_files: HashSet<&str> = read
        .iter()
        .filter(|(d, _)| !doomed.contains(*d))
        .map(|(_, r)| &*r.nar)
        .collect();

    // Tombstones past the grace period: their files go (unless pointed at again), then they.
    let mut remove_now: Vec<String> = orphans.iter().map(|k| k.to_string()).collect();
    for (t, keys) in &stones {
        if age(t) >= opts.grace {
            remove_now.extend(
                keys.iter()
                    .filter(|k| !is_live(k, &live_files, &read, &doomed))
                    .cloned(),
            );
            remove_now.push(t.key.clone());
        }
    }
    report.deferred_files += pending.len() as u64;
    remove_now.sort();
    remove_now.dedup();

    // The doomed narinfos' files, recorded before the narinfos go.
    let mut doomed_files: Vec<String> = doomed
        .iter()
        .flat_map(|d| read[d].files(d))
        .filter(|k| !live_files.contains(k.as_str()) && sizes.contains_key(k.as_str()))
        .collect();
    doomed_files.sort();
    doomed_files.dedup();

    // What the cache holds once this run and the grace periods are over.
    let doomed_narinfos: Vec<String> = doomed.iter().map(|d| format!("{d}.narinfo")).collect();
    let leaving: HashSet<&str> = doomed_narinfos
        .iter()
        .chain(&remove_now)
        .chain(&doomed_files)
        .map(String::as_str)
        .chain(pending.iter().copied())
        .chain(stones.iter().map(|(t, _)| t.key.as_str()))
        .collect();
    report.kept_bytes = report
        .total_bytes
        .saturating_sub(leaving.iter().filter_map(|k| sizes.get(k)).sum());
    drop(leaving);

    if opts.dry_run {
        let mut doomed_keys = doomed_narinfos;
        doomed_keys.sort();
        report.freed_bytes = doomed_keys
            .iter()
            .chain(&remove_now)
            .filter_map(|k| sizes.get(k.as_str()))
            .sum();
        report.removed_narinfos = doomed_keys;
        report.removed_files = remove_now;
        report.deferred_files += doomed_files.len() as u64;
        return Ok(report);
    }

    for key in &remove_now {
        blobs.delete(key).await?;
        report.freed_bytes += sizes.get(key.as_str()).copied().unwrap_or(0);
        report.removed_files.push(key.clone());
    }
    if !doomed.is_empty() {
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
        // Their texts, to put back what a writer references after all (below). Read again
        // rather than kept from the first read: only the doomed need them, and holding every
        // narinfo's text would cost hundreds of megabytes in a large cache.
        let mut saved = HashMap::new();
        for d in &doomed {
            let key = format!("{d}.narinfo");
            match cache.read_small(&key, MAX_NARINFO_BYTES).await {
                Ok(text) => {
                    saved.insert(*d, text);
                }
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Only the doomed: removal order and restoring look at nothing else.
        let graph: HashMap<Digest, Vec<Digest>> =
            doomed.iter().map(|d| (*d, read[d].refs.to_vec())).collect();
        let referrers = referrers_of(&graph);
        report.removed_narinfos =
            remove_referrers_first(blobs.as_ref(), &doomed, &referrers, &graph).await?;
        report.freed_bytes += report
            .removed_narinfos
            .iter()
            .filter_map(|k| sizes.get(k.as_str()))
            .sum::<u64>();
        report.restored = restore_referenced(&blobs, &cache, &read, &saved, &graph, opts).await?;
    }
    Ok(report)
}

/// After removing: a narinfo written since the last listing may reference a removed path
/// (its uploader found it present moments before). Those removed narinfos, and what they
/// reference among the removed, are put back, references first; their files are still there,
/// since files go only a grace period after their narinfo.
async fn restore_referenced(
    blobs: &Arc<dyn Blobs>,
    cache: &BinaryCache,
    read: &HashMap<Digest, Read>,
    saved: &HashMap<Digest, String>,
    graph: &HashMap<Digest, Vec<Digest>>,
    opts: &GcOptions,
) -> Result<Vec<String>, StoreError> {
    let now: Vec<Digest> = blobs
        .list_meta("")
        .await?
        .iter()
        .filter_map(|m| Digest::parse(m.key.strip_suffix(".narinfo")?).ok())
        .filter(|d| !read.contains_key(d))
        .collect();
    if now.is_empty() {
        return Ok(Vec::new());
    }
    let (written, _) = read_all(cache, now.into_iter(), opts).await;
    // Removed paths the new narinfos need, with their removed references.
    let mut needed = HashSet::new();
    let mut todo: Vec<Digest> = written
        .values()
        .flat_map(|r| r.refs.iter().copied())
        .filter(|d| saved.contains_key(d))
        .collect();
    while let Some(d) = todo.pop() {
        if needed.insert(d) {
            todo.extend(
                graph
                    .get(&d)
                    .into_iter()
                    .flatten()
                    .filter(|r| saved.contains_key(*r)),
            );
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
                graph
                    .get(*d)
                    .into_iter()
                    .flatten()
                    .all(|r| r == *d || !needed.contains(r) || back.contains(r))
            })
            .copied()
            .collect();
        ready.sort();
        for d in ready {
            let key = format!("{d}.narinfo");
            let text = saved[&d].clone();
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

/// Reads narinfos: what each references and the files that belong to it (its NAR, its
/// `.ls`); and which could not be read or parsed.
async fn read_all(
    cache: &BinaryCache,
    digests: impl Iterator<Item = Digest>,
    opts: &GcOptions,
) -> (HashMap<Digest, Read>, Vec<Digest>) {
    let results: Vec<(Digest, Result<Read, StoreError>)> = futures::stream::iter(digests)
        .map(|d| async move {
            let r = cache.narinfo(&d).await.map(|info| Read {
                refs: info.references.iter().map(|r| *r.digest()).collect(),
                nar: info.url.as_str().into(),
            });
            (d, r)
        })
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;
    let mut read = HashMap::new();
    let mut unreadable = Vec::new();
    for (d, r) in results {
        match r {
            Ok(r) => {
                read.insert(d, r);
            }
            // Removed by someone else meanwhile: nothing to keep or remove.
            Err(StoreError::NotFound(_)) => {}
            Err(_) => unreadable.push(d),
        }
    }
    (read, unreadable)
}

/// Whether a tombstoned file is pointed at again by a narinfo that stays (its `.ls` by the
/// path itself).
fn is_live(
    key: &str,
    live_files: &HashSet<&str>,
    read: &HashMap<Digest, Read>,
    doomed: &HashSet<Digest>,
) -> bool {
    match key.strip_suffix(".ls").map(Digest::parse) {
        Some(Ok(d)) => read.contains_key(&d) && !doomed.contains(&d),
        _ => live_files.contains(key),
    }
}

/// The least recently used paths among those neither `kept` nor already `doomed`, enough of
/// them to free `wanted` bytes (or all there are), closed under referrers: a path goes only
/// with every path that references it.
///
/// A path counts as used when the most recently used path whose closure holds it was, so
/// taking paths in that order takes referrers no later than what they reference.
fn least_recently_used(
    read: &HashMap<Digest, Read>,
    kept: &HashSet<Digest>,
    doomed: &HashSet<Digest>,
    last_use: &HashMap<Digest, SystemTime>,
    bytes: impl Fn(&Digest) -> u64,
    wanted: u64,
) -> HashSet<Digest> {
    let candidate = |d: &Digest| read.contains_key(d) && !kept.contains(d) && !doomed.contains(d);
    // Most recent first; each path's effective use is the first time a walk reaches it.
    let mut by_use: Vec<(SystemTime, Digest)> = last_use
        .iter()
        .filter(|(d, _)| candidate(d))
        .map(|(d, t)| (*t, *d))
        .collect();
    by_use.sort_unstable_by(|a, b| b.cmp(a));
    let mut effective: HashMap<Digest, SystemTime> = HashMap::with_capacity(by_use.len());
    for (t, root) in &by_use {
        let mut todo = vec![*root];
        while let Some(d) = todo.pop() {
            if !candidate(&d) || effective.contains_key(&d) {
                continue;
            }
            effective.insert(d, *t);
            todo.extend(read[&d].refs.iter().copied());
        }
    }
    // Least recent first; the prefix that frees enough, then its referrers.
    let mut order: Vec<(SystemTime, Digest)> = effective.into_iter().map(|(d, t)| (t, d)).collect();
    order.sort_unstable();
    let mut chosen = HashSet::new();
    let mut freed = 0u64;
    for (_, d) in order {
        if freed >= wanted {
            break;
        }
        freed += bytes(&d);
        chosen.insert(d);
    }
    let mut referrers: HashMap<Digest, Vec<Digest>> = HashMap::new();
    for (d, r) in read.iter().filter(|(d, _)| candidate(d)) {
        for to in r.refs.iter().filter(|to| *to != d && candidate(to)) {
            referrers.entry(*to).or_default().push(*d);
        }
    }
    let mut todo: Vec<Digest> = chosen.iter().copied().collect();
    while let Some(d) = todo.pop() {
        for r in referrers.get(&d).into_iter().flatten() {
            if chosen.insert(*r) {
                todo.push(*r);
            }
        }
    }
    chosen
}

/// Every path reachable from `roots` through references, the roots included.
fn closure(
    read: &HashMap<Digest, Read>,
    roots: impl IntoIterator<Item = Digest>,
) -> HashSet<Digest> {
    let mut kept = HashSet::new();
    let mut todo: Vec<Digest> = roots.into_iter().collect();
    while let Some(d) = todo.pop() {
        if kept.insert(d) {
            if let Some(r) = read.get(&d) {
                todo.extend(r.refs.iter().copied());
            }
        }
    }
    kept
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

    fn d(i: u8) -> Digest {
        let mut s = String::from("0000000000000000000000000000000");
        s.push(b"0123456789abcdfg"[i as usize] as char);
        Digest::parse(&s).unwrap()
    }

    /// Least recently used goes first, a path counts as used when a referrer was, and what
    /// goes is closed under referrers; kept paths never go.
    #[test]
    fn least_recently_used_takes_referrers_with_what_they_reference() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let graph = |edges: &[(u8, &[u8])]| -> HashMap<Digest, Read> {
            edges
                .iter()
                .map(|(from, to)| {
                    let refs: Vec<Digest> = to.iter().map(|i| d(*i)).collect();
                    (
                        d(*from),
                        Read {
                            refs: refs.into(),
                            nar: format!("nar/{from}.nar").into(),
                        },
                    )
                })
                .collect()
        };
        // 1 → 2 → 3, and 4 alone; 3 served recently, 1 and 2 long ago.
        let read = graph(&[(1, &[2]), (2, &[3]), (3, &[]), (4, &[])]);
        let uses: HashMap<Digest, SystemTime> = [(1, 1), (2, 2), (3, 10), (4, 5)]
            .iter()
            .map(|(i, s)| (d(*i), t(*s)))
            .collect();
        let none = HashSet::new();
        let pick = |kept: &HashSet<Digest>, wanted| {
            let mut v: Vec<Digest> = least_recently_used(&read, kept, &none, &uses, |_| 1, wanted)
                .into_iter()
                .collect();
            v.sort();
            v
        };
        assert_eq!(pick(&none, 1), [d(1)]);
        assert_eq!(pick(&none, 2), [d(1), d(2)]);
        assert_eq!(pick(&none, 3), [d(1), d(2), d(4)]);
        assert_eq!(pick(&none, 99), [d(1), d(2), d(3), d(4)]);
        // 2 kept (with its closure, 3): only 1 and 4 may go.
        let kept: HashSet<Digest> = [d(2), d(3)].into();
        assert_eq!(pick(&kept, 99), [d(1), d(4)]);

        // A recent referrer makes what it references recent: 5 (used at 10) → 6 (used at 1).
        let read = graph(&[(5, &[6]), (6, &[]), (7, &[])]);
        let uses: HashMap<Digest, SystemTime> = [(5, 10), (6, 1), (7, 5)]
            .iter()
            .map(|(i, s)| (d(*i), t(*s)))
            .collect();
        let got = least_recently_used(&read, &none, &none, &uses, |_| 1, 1);
        assert_eq!(got, [d(7)].into());
        // Asked for 2, both 5 and 6 (equally recent) go together, never 6 alone.
        let got = least_recently_used(&read, &none, &none, &uses, |_| 1, 2);
        assert!(got.contains(&d(7)) && got.contains(&d(5)), "{got:?}");
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
