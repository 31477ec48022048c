//! `fsck`: what is wrong with a binary cache (a `file://` folder, an S3 or GCS bucket), read
//! from the cache alone, whoever wrote it (`nix copy`, Hydra, `upload`): no database.
//!
//! Every narinfo is read and parsed; its NAR must exist with the narinfo's `FileSize`; every
//! path it references must have a narinfo; with trusted keys, it must carry a signature by one;
//! with `verify_content`, the NAR is streamed and its `FileHash`, `NarHash` and `NarSize`
//! recomputed. NAR files no narinfo points at are orphans (an interrupted writer's, or what a
//! collection has not removed yet).
//!
//! Nothing is changed unless `repair` is asked for. Given a store to repair from
//! ([`FsckOptions::from_store`], the local Nix store for `fsck --from-store`), repair first
//! writes again, as `upload` writes a path, every broken path that store holds, and every
//! missing path a narinfo references, references before referrers. What cannot be written
//! again goes: the narinfos of those paths and of every path that references one (referrers
//! first). So at every moment each narinfo in the cache has its NAR and its references: Nix
//! then builds or fetches the removed paths elsewhere instead of failing halfway through a
//! closure. A finding is checked again just before it is acted on, so a writer that was
//! mid-closure while the cache was listed is not undercut. NAR files of removed narinfos are
//! left for a collection to remove after its grace period, since a CDN or another server may
//! still hand out the removed narinfos for a while; the damaged NAR file of a path written
//! again is removed at once, as nothing can use it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio_util::io::StreamReader;

use crate::formats::hash::HashingCounter;
use crate::formats::{Digest, NarInfo, PublicKey};
use crate::nar_files::MAX_DECODER_WINDOW;
use crate::publish::{publish, PublishOptions};
use crate::store::binary_cache::BinaryCache;
use crate::store::blobs::Blobs;
use crate::store::{Store, StoreError};

/// What to check besides the structure.
#[derive(Debug, Clone, Default)]
pub struct FsckOptions {
    /// Stream every NAR and recompute its hashes and size (reads the whole cache).
    pub verify_content: bool,
    /// Every narinfo must carry a valid signature by one of these (none given: not checked).
    pub trusted_keys: Vec<PublicKey>,
    /// Narinfos checked at once (at least 1).
    pub jobs: usize,
    /// Where to count progress, for a line on a terminal.
    pub progress: Option<Arc<crate::progress::Progress>>,
    /// Repair: write broken paths again from `from_store` when given, and remove the
    /// narinfos of those that cannot be and of their referrers.
    pub repair: bool,
    /// With `repair`, the store broken and missing paths are written again from (none:
    /// repair only removes).
    pub from_store: Option<FromStore>,
}

/// Where repair writes broken paths again from, and how.
#[derive(Clone)]
pub struct FromStore {
    /// The store that holds the paths, such as the local Nix store
    /// ([`crate::store::local::LocalStore`]); a path it does not have is removed instead.
    pub store: Arc<dyn Store>,
    /// How paths are written (compression, listing, signing keys), as `upload` takes them.
    pub publish: PublishOptions,
}

impl fmt::Debug for FromStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromStore")
            .field("store", &self.store.describe())
            .field("publish", &self.publish)
            .finish()
    }
}

/// A kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// A narinfo that cannot be read or parsed, or that describes another path than its name.
    Unparsable,
    /// A narinfo whose NAR file is missing.
    MissingNar,
    /// A NAR file whose size is not the narinfo's `FileSize`.
    SizeMismatch,
    /// A NAR whose `FileHash`, `NarHash` or `NarSize` is not what its bytes give, or that does
    /// not decompress.
    ContentMismatch,
    /// A narinfo referencing a path the cache has no narinfo for.
    DanglingReference,
    /// A narinfo without a valid signature by any trusted key.
    Unsigned,
    /// A NAR file no narinfo points at.
    OrphanNar,
}

impl FindingKind {
    /// Whether a path with this finding cannot be substituted as it is (and repair writes
    /// it again or removes its narinfo); unsigned paths and orphan NARs are reported only.
    pub fn is_broken(self) -> bool {
        !matches!(self, FindingKind::Unsigned | FindingKind::OrphanNar)
    }
}

impl FindingKind {
    /// Every kind, in report order.
    pub const ALL: [FindingKind; 7] = [
        FindingKind::Unparsable,
        FindingKind::MissingNar,
        FindingKind::SizeMismatch,
        FindingKind::ContentMismatch,
        FindingKind::DanglingReference,
        FindingKind::Unsigned,
        FindingKind::OrphanNar,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::Unparsable => "unparsable",
            FindingKind::MissingNar => "missing-nar",
            FindingKind::SizeMismatch => "size-mismatch",
            FindingKind::ContentMismatch => "content-mismatch",
            FindingKind::DanglingReference => "dangling-reference",
            FindingKind::Unsigned => "unsigned",
            FindingKind::OrphanNar => "orphan-nar",
        }
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One problem with one object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    /// What is wrong.
    pub kind: FindingKind,
    /// The object it is about (`<digest>.narinfo`, `nar/…`).
    pub key: String,
    /// The particulars, for a person.
    pub detail: String,
}

/// What a check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckReport {
    /// Narinfos checked.
    pub narinfos: u64,
    /// NAR files in the cache.
    pub nar_files: u64,
    /// NAR bytes streamed (with `verify_content`).
    pub verified_bytes: u64,
    /// Every problem, sorted by kind and key.
    pub findings: Vec<Finding>,
    /// The narinfos repair wrote again from [`FsckOptions::from_store`] (with their NARs),
    /// in the order it wrote them: references first.
    pub reuploaded: Vec<String>,
    /// The narinfos repair removed, in the order it removed them.
    pub removed: Vec<String>,
}

impl FsckReport {
    /// How many findings of `kind`.
    pub fn count(&self, kind: FindingKind) -> usize {
        self.findings.iter().filter(|f| f.kind == kind).count()
    }

    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks the binary cache in `blobs`.
///
/// Fails when the cache cannot be listed or an object cannot be read for a reason other than
/// its content (an outage, a timeout, a refused request): that is not a finding, and repair
/// must never remove a narinfo because the bucket was briefly unreachable. Everything wrong
/// with single objects is a finding.
pub async fn fsck(blobs: Arc<dyn Blobs>, opts: &FsckOptions) -> Result<FsckReport, StoreError> {
    let cache = BinaryCache::new(blobs.clone());
    let digests: Vec<Digest> = cache.list().await?;
    let known: HashSet<Digest> = digests.iter().copied().collect();
    // Sorted and compact: at a million NAR files, a map of owned keys would cost hundreds of
    // megabytes. The listing also answers "does the NAR exist, how big" without a request per
    // narinfo.
    let mut nar_files: Vec<NarFile> = blobs
        .list_meta("nar/")
        .await?
        .into_iter()
        .map(|m| NarFile {
            key: m.key.into_boxed_str(),
            size: m.size,
            modified: m.modified,
            users: AtomicU32::new(0),
        })
        .collect();
    nar_files.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    nar_files.shrink_to_fit();

    let mut report = FsckReport {
        nar_files: nar_files.len() as u64,
        ..Default::default()
    };
    // NAR files outside the listing (not under nar/, or written since) and how many
    // narinfos point at each.
    let mut unlisted_users: HashMap<String, usize> = HashMap::new();
    let mut broken = Vec::new();
    let mut graph = HashMap::new();
    {
        let listed: &[NarFile] = &nar_files;
        let mut checks = futures::stream::iter(digests)
            .map(|d| check_one(&cache, blobs.as_ref(), d, Some(&known), Some(listed), opts))
            .buffer_unordered(opts.jobs.max(1));
        // Folded as they come, not collected: one result per narinfo adds up.
        crate::progress::with(&opts.progress, |p| {
            p.phase("checking narinfos", known.len() as u64)
        });
        while let Some(c) = checks.next().await {
            let c = c?;
            crate::progress::with(&opts.progress, crate::progress::Progress::step);
            report.narinfos += 1;
            if c.findings.iter().any(|f| f.kind.is_broken()) {
                broken.push(c.digest);
            }
            report.findings.extend(c.findings);
            report.verified_bytes += c.verified;
            if let Some(u) = c.url {
                match find_nar(listed, &u) {
                    Some(i) => {
                        listed[i].users.fetch_add(1, Ordering::Relaxed);
                    }
                    None => *unlisted_users.entry(u).or_default() += 1,
                }
            }
            // Only repair needs the graph; at a million paths it is not small.
            if opts.repair {
                graph.insert(c.digest, c.refs);
            }
        }
    }
    // How many narinfos point at each NAR file, where more than one does: a damaged one is
    // removed once its path is written again only when no other narinfo still points at it.
    let nar_users: HashMap<String, usize> = nar_files
        .iter()
        .map(|f| (f, f.users.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 1)
        .map(|(f, n)| (f.key.to_string(), n as usize))
        .chain(unlisted_users.into_iter().filter(|(_, n)| *n > 1))
        .collect();
    let now = std::time::SystemTime::now();
    for NarFile {
        key,
        modified,
        users,
        ..
    } in &nar_files
    {
        if users.load(Ordering::Relaxed) == 0 {
            // Its age tells a writer's file in progress (minutes) from a leftover (days).
            let age = modified
                .and_then(|m| now.duration_since(m).ok())
                .map(|a| {
                    format!(
                        " (written {} ago)",
                        humantime::format_duration(std::time::Duration::from_secs(a.as_secs()))
                    )
                })
                .unwrap_or_default();
            report.findings.push(Finding {
                kind: FindingKind::OrphanNar,
                key: key.to_string(),
                detail: format!("no narinfo points at this NAR file{age}"),
            });
        }
    }
    report.findings.sort();
    if opts.repair {
        let repaired = repair(&cache, blobs.as_ref(), broken, &graph, &nar_users, opts).await?;
        report.reuploaded = repaired.reuploaded;
        report.removed = repaired.removed;
    }
    Ok(report)
}

/// What repair did.
#[derive(Debug, Default)]
struct Repaired {
    /// Narinfos written again, in order.
    reuploaded: Vec<String>,
    /// Narinfos removed, in order.
    removed: Vec<String>,
}

/// A path still broken when looked at again.
struct StillBroken {
    /// Its narinfo or NAR is damaged (not only a reference missing): it must be written again.
    damaged: bool,
    /// Its NAR file when that exists but is wrong, to remove once the path is written again.
    bad_nar: Option<String>,
    /// Its references that have no narinfo now.
    missing_refs: Vec<Digest>,
}

/// Repairs the `broken` paths that are still broken when looked at again: writes them (and
/// the missing paths they reference) again from `opts.from_store` when it has them, then
/// removes the narinfos of what could not be written and of everything that references it,
/// referrers first.
async fn repair(
    cache: &BinaryCache,
    blobs: &dyn Blobs,
    broken: Vec<Digest>,
    graph: &HashMap<Digest, Vec<Digest>>,
    nar_users: &HashMap<String, usize>,
    opts: &FsckOptions,
) -> Result<Repaired, StoreError> {
    let mut still = HashMap::new();
    for digest in broken {
        // Checked again against the cache as it is now: the reference that was missing may
        // have been written since (its writer was mid-closure), the NAR may have arrived.
        let again = check_one(cache, blobs, digest, None, None, opts).await?;
        let damaged = again
            .findings
            .iter()
            .any(|f| f.kind.is_broken() && f.kind != FindingKind::DanglingReference);
        let bad_nar = again
            .findings
            .iter()
            .any(|f| {
                matches!(
                    f.kind,
                    FindingKind::SizeMismatch | FindingKind::ContentMismatch
                )
            })
            .then(|| again.url.clone())
            .flatten();
        let missing_refs = missing_now(blobs, &again.refs, digest).await?;
        if damaged || !missing_refs.is_empty() {
            still.insert(
                digest,
                StillBroken {
                    damaged,
                    bad_nar,
                    missing_refs,
                },
            );
        }
    }

    let mut plan = Plan::default();
    for (digest, b) in &still {
        if b.damaged {
            plan.want(blobs, opts, graph, &still, *digest).await?;
        } else {
            for r in &b.missing_refs {
                plan.want(blobs, opts, graph, &still, *r).await?;
            }
        }
    }
    // What each path needs to stay: the references it will have once repaired.
    let mut needs: HashMap<Digest, Vec<Digest>> = graph.clone();
    for (d, refs) in &plan.upload {
        needs.insert(*d, refs.clone());
    }
    for (d, b) in &still {
        if !b.damaged {
            needs.entry(*d).or_default().extend(&b.missing_refs);
        }
    }
    let needed_by = referrers_of(&needs);
    let mut bad = HashSet::new();
    for d in std::mem::take(&mut plan.unavailable) {
        spread(&mut bad, &needed_by, d);
    }

    let mut reuploaded = Vec::new();
    if let Some(from) = opts.from_store.as_ref().filter(|_| !plan.upload.is_empty()) {
        let store_dir = from.store.cache_info().await?.store_dir;
        cache.prepare_for_upload(&store_dir).await?;
        for d in plan.order() {
            if bad.contains(&d) {
                continue; // a reference of it could not be written after all
            }
            let key = format!("{d}.narinfo");
            if !graph.contains_key(&d) && blobs.head(&key).await?.is_some() {
                continue; // another writer put it there meanwhile
            }
            match publish(from.store.as_ref(), cache, &d, &from.publish).await {
                Ok(info) => {
                    tracing::info!("wrote {key} again from {}", from.store.describe());
                    reuploaded.push(key);
                    // The damaged file is of no use to anyone; the new narinfo points at
                    // another one unless both are keyed alike.
                    if let Some(old) = still.get(&d).and_then(|b| b.bad_nar.as_ref()) {
                        if *old != info.url && nar_users.get(old).copied().unwrap_or(0) <= 1 {
                            blobs.delete(old).await?;
                            tracing::info!("removed the damaged NAR file {old}");
                        }
                    }
                }
                // The path itself is at fault (gone from the store since, or its NAR does
                // not match its hash there): it goes like one the store never had.
                Err(
                    e @ (StoreError::NotFound(_)
                    | StoreError::Corrupt(_)
                    | StoreError::Invalid(_)
                    | StoreError::Unsupported(_)),
                ) => {
                    tracing::warn!("cannot write {key} again: {e}");
                    spread(&mut bad, &needed_by, d);
                }
                Err(e) => return Err(e),
            }
        }
    }

    let doomed: HashSet<Digest> = bad.into_iter().filter(|d| graph.contains_key(d)).collect();
    let removed = remove_referrers_first(blobs, &doomed, &referrers_of(graph), graph).await?;
    Ok(Repaired {
        reuploaded,
        removed,
    })
}

/// Marks `digest` and everything that needs it, directly or not, as impossible to keep.
fn spread(bad: &mut HashSet<Digest>, needed_by: &HashMap<Digest, Vec<Digest>>, digest: Digest) {
    let mut todo = vec![digest];
    while let Some(d) = todo.pop() {
        if bad.insert(d) {
            todo.extend(needed_by.get(&d).into_iter().flatten().copied());
        }
    }
}

/// The paths repair writes again, with the references each has in the store it comes from.
#[derive(Default)]
struct Plan {
    /// Paths to write, with their references (self-references left out).
    upload: HashMap<Digest, Vec<Digest>>,
    /// Paths that must be written but cannot be (no store to write from, or it lacks them).
    unavailable: Vec<Digest>,
}

impl Plan {
    /// Plans to write `digest` and, first, each of its references the cache lacks or holds
    /// damaged.
    async fn want(
        &mut self,
        blobs: &dyn Blobs,
        opts: &FsckOptions,
        graph: &HashMap<Digest, Vec<Digest>>,
        still: &HashMap<Digest, StillBroken>,
        digest: Digest,
    ) -> Result<(), StoreError> {
        let mut todo = vec![digest];
        let mut seen: HashSet<Digest> = self.upload.keys().copied().collect();
        seen.extend(self.unavailable.iter().copied());
        while let Some(d) = todo.pop() {
            if !seen.insert(d) {
                continue;
            }
            let info = match &opts.from_store {
                None => None,
                Some(from) => match from.store.narinfo(&d).await {
                    Ok(info) => Some(info),
                    Err(
                        StoreError::NotFound(_) | StoreError::Corrupt(_) | StoreError::Invalid(_),
                    ) => None,
                    // The store cannot be asked: better to stop than to remove what it holds.
                    Err(e) => return Err(e),
                },
            };
            let Some(info) = info else {
                self.unavailable.push(d);
                continue;
            };
            let refs: Vec<Digest> = info
                .references
                .iter()
                .map(|r| *r.digest())
                .filter(|r| *r != d)
                .collect();
            for r in &refs {
                let damaged = still.get(r).is_some_and(|b| b.damaged);
                let absent =
                    !graph.contains_key(r) && blobs.head(&format!("{r}.narinfo")).await?.is_none();
                if damaged || absent {
                    todo.push(*r);
                }
            }
            self.upload.insert(d, refs);
        }
        Ok(())
    }

    /// The paths to write, each after every one of its references that is written too.
    fn order(&self) -> Vec<Digest> {
        let mut out = Vec::new();
        let mut done = HashSet::new();
        let mut entered = HashSet::new();
        let mut roots: Vec<Digest> = self.upload.keys().copied().collect();
        roots.sort();
        for root in roots {
            // Depth first, a path pushed out once all its references are.
            let mut stack = vec![(root, false)];
            while let Some((d, expanded)) = stack.pop() {
                if expanded {
                    if done.insert(d) {
                        out.push(d);
                    }
                    continue;
                }
                // Entered once: a reference cycle (Nix makes none) cannot loop forever.
                if !entered.insert(d) {
                    continue;
                }
                stack.push((d, true));
                for r in self.upload.get(&d).into_iter().flatten() {
                    if self.upload.contains_key(r) && !entered.contains(r) {
                        stack.push((*r, false));
                    }
                }
            }
        }
        out
    }
}

/// Who references each path (self-references left out), from a map of each path's references.
pub(crate) fn referrers_of(graph: &HashMap<Digest, Vec<Digest>>) -> HashMap<Digest, Vec<Digest>> {
    let mut referrers: HashMap<Digest, Vec<Digest>> = HashMap::new();
    for (from, refs) in graph {
        for r in refs {
            if r != from {
                referrers.entry(*r).or_default().push(*from);
            }
        }
    }
    referrers
}

/// Removes the narinfos of `doomed`, each only once no doomed path that references it is
/// left, so that no narinfo in the cache ever references a removed one; the keys removed, in
/// order.
pub(crate) async fn remove_referrers_first(
    blobs: &dyn Blobs,
    doomed: &HashSet<Digest>,
    referrers: &HashMap<Digest, Vec<Digest>>,
    graph: &HashMap<Digest, Vec<Digest>>,
) -> Result<Vec<String>, StoreError> {
    let mut waiting: HashMap<Digest, usize> = doomed
        .iter()
        .map(|d| {
            let n = referrers
                .get(d)
                .into_iter()
                .flatten()
                .filter(|r| doomed.contains(*r))
                .count();
            (*d, n)
        })
        .collect();
    let mut ready: Vec<Digest> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(d, _)| *d)
        .collect();
    ready.sort();
    let mut removed = Vec::new();
    while !waiting.is_empty() {
        let Some(d) = ready.pop() else {
            // A reference cycle (Nix makes none besides self-references): the rest at once.
            let mut rest: Vec<Digest> = waiting.keys().copied().collect();
            rest.sort();
            ready = rest;
            waiting.retain(|_, n| {
                *n = 0;
                true
            });
            continue;
        };
        if waiting.remove(&d).is_none() {
            continue;
        }
        let key = format!("{d}.narinfo");
        blobs.delete(&key).await?;
        tracing::info!("removed {key}");
        removed.push(key);
        for r in graph.get(&d).into_iter().flatten() {
            if let Some(n) = waiting.get_mut(r) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    ready.push(*r);
                }
            }
        }
    }
    Ok(removed)
}

/// The references of `digest` that have no narinfo in the cache now.
async fn missing_now(
    blobs: &dyn Blobs,
    refs: &[Digest],
    digest: Digest,
) -> Result<Vec<Digest>, StoreError> {
    let mut missing = Vec::new();
    for r in refs {
        if *r != digest && blobs.head(&format!("{r}.narinfo")).await?.is_none() {
            missing.push(*r);
        }
    }
    Ok(missing)
}

/// What checking one narinfo gave.
/// A NAR file as listed, and how many narinfos point at it.
struct NarFile {
    key: Box<str>,
    size: u64,
    modified: Option<std::time::SystemTime>,
    users: AtomicU32,
}

fn find_nar(files: &[NarFile], key: &str) -> Option<usize> {
    files.binary_search_by(|f| (*f.key).cmp(key)).ok()
}

struct Checked {
    digest: Digest,
    findings: Vec<Finding>,
    /// Its NAR's key, when the narinfo parsed.
    url: Option<String>,
    /// The paths it references.
    refs: Vec<Digest>,
    /// NAR bytes streamed.
    verified: u64,
}

/// Checks one narinfo. References are checked against `known` (`None` leaves them to the
/// caller); its NAR's size is taken from `listed` when it is there, else asked for. Fails
/// when the store could not be asked (see [`fsck`]).
async fn check_one(
    cache: &BinaryCache,
    blobs: &dyn Blobs,
    digest: Digest,
    known: Option<&HashSet<Digest>>,
    listed: Option<&[NarFile]>,
    opts: &FsckOptions,
) -> Result<Checked, StoreError> {
    let mut checked = Checked {
        digest,
        findings: Vec::new(),
        url: None,
        refs: Vec::new(),
        verified: 0,
    };
    let key = format!("{digest}.narinfo");
    let mut out = Vec::new();
    let mut finding = |kind, detail: String| {
        out.push(Finding {
            kind,
            key: key.clone(),
            detail,
        })
    };
    let info = match cache.narinfo(&digest).await {
        Ok(info) => info,
        Err(StoreError::NotFound(_)) => return Ok(checked), // removed while we looked
        Err(e @ (StoreError::Corrupt(_) | StoreError::Invalid(_))) => {
            finding(FindingKind::Unparsable, e.to_string());
            checked.findings = out;
            return Ok(checked);
        }
        Err(e) => return Err(e),
    };
    for r in &info.references {
        if r.digest() != &digest && known.is_some_and(|k| !k.contains(r.digest())) {
            finding(
                FindingKind::DanglingReference,
                format!("references {r}, which the cache has no narinfo for"),
            );
        }
    }
    if !opts.trusted_keys.is_empty() && info.verified_by(&opts.trusted_keys).is_empty() {
        finding(
            FindingKind::Unsigned,
            if info.sigs.is_empty() {
                "no signature".into()
            } else {
                format!(
                    "no valid signature by a trusted key (signed by {})",
                    info.sigs
                        .iter()
                        .map(|s| s.key_name.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        );
    }
    let mut verified = 0;
    let size = match listed.and_then(|l| find_nar(l, &info.url).map(|i| l[i].size)) {
        Some(size) => Ok(Some(size)),
        None => blobs.head(&info.url).await,
    };
    match size {
        Ok(None) => finding(
            FindingKind::MissingNar,
            format!("its NAR {} does not exist", info.url),
        ),
        Err(e) => return Err(e),
        Ok(Some(size)) => {
            if let Some(want) = info.file_size.filter(|w| *w != size) {
                finding(
                    FindingKind::SizeMismatch,
                    format!(
                        "its NAR {} has {size} bytes, FileSize says {want}",
                        info.url
                    ),
                );
            } else if opts.verify_content {
                match verify_content(cache, &info).await? {
                    Ok(n) => verified = n,
                    Err(e) => finding(FindingKind::ContentMismatch, e),
                }
            }
        }
    }
    checked.findings = out;
    checked.url = Some(info.url.clone());
    checked.refs = info.references.iter().map(|r| *r.digest()).collect();
    checked.verified = verified;
    Ok(checked)
}

/// Streams the NAR of `info` once, hashing the file as stored and the NAR inside it; the bytes
/// read, or what does not match. Fails when the store could not be read (see [`fsck`]): a
/// stream that breaks off says nothing about the bytes that did not arrive.
async fn verify_content(
    cache: &BinaryCache,
    info: &NarInfo,
) -> Result<Result<u64, String>, StoreError> {
    let blob = match cache.nar(&info.url, None).await {
        Ok(blob) => blob,
        Err(e @ (StoreError::NotFound(_) | StoreError::Corrupt(_) | StoreError::Invalid(_))) => {
            return Ok(Err(format!("its NAR {} cannot be read: {e}", info.url)))
        }
        Err(e) => return Err(e),
    };
    let mut file_hash = HashingCounter::new();
    // The decoder reports the stream's errors and its own alike; this tells them apart.
    let broke_off = std::sync::Mutex::new(None::<String>);
    let raw = blob
        .stream
        .inspect_ok(|chunk| file_hash.update(chunk))
        .inspect_err(|e| *broke_off.lock().expect("broke_off") = Some(e.to_string()));
    let mut decoder = info.compression.decoder_within(
        tokio::io::BufReader::new(StreamReader::new(raw)),
        MAX_DECODER_WINDOW,
    );
    let mut nar_hash = HashingCounter::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match decoder.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                if let Some(cause) = broke_off.lock().expect("broke_off").take() {
                    return Err(StoreError::backend(
                        format!("reading the NAR {}", info.url),
                        cause,
                    ));
                }
                return Ok(Err(format!(
                    "its NAR {} does not decompress: {e}",
                    info.url
                )));
            }
        };
        if n == 0 {
            break;
        }
        nar_hash.update(&buf[..n]);
        // More than NarSize is wrong already; reading on would only cost time.
        if nar_hash.len() > info.nar_size {
            return Ok(Err(format!(
                "its NAR {} holds more than NarSize {} bytes",
                info.url, info.nar_size
            )));
        }
    }
    drop(decoder);
    let (got_nar, nar_size) = nar_hash.finish();
    let (got_file, file_size) = file_hash.finish();
    let mut wrong = Vec::new();
    if nar_size != info.nar_size {
        wrong.push(format!("NarSize is {nar_size}, not {}", info.nar_size));
    }
    if got_nar.digest() != info.nar_hash.digest() {
        wrong.push(format!("NarHash is {got_nar}, not {}", info.nar_hash));
    }
    if let Some(want) = &info.file_hash {
        if got_file.digest() != want.digest() {
            wrong.push(format!("FileHash is {got_file}, not {want}"));
        }
    }
    Ok(if wrong.is_empty() {
        Ok(file_size)
    } else {
        Err(format!("its NAR {}: {}", info.url, wrong.join("; ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryBlobs;

    const A: &str = "5r1dlyl2wyar1nn50ry8xi6apps79m0j";
    const B: &str = "6r1dlyl2wyar1nn50ry8xi6apps79m0j";

    fn narinfo(digest: &str, refs: &str) -> String {
        format!(
            "StorePath: /nix/store/{digest}-x\nURL: nar/{digest}.nar\nCompression: none\n\
             NarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\n\
             NarSize: 1240\nReferences: {refs}\n"
        )
    }

    async fn put(blobs: &MemoryBlobs, key: &str, text: String) {
        let stream: crate::store::ByteStream = Box::pin(futures::stream::once(async move {
            Ok(bytes::Bytes::from(text))
        }));
        blobs.put(key, stream, "text/plain").await.unwrap();
    }

    /// A cache whose `head` fails as a backend outage does.
    struct Down(MemoryBlobs);

    #[async_trait::async_trait]
    impl Blobs for Down {
        fn describe(&self) -> String {
            "down".into()
        }
        async fn get(
            &self,
            key: &str,
            range: Option<crate::store::ByteRange>,
        ) -> crate::store::Result<crate::store::Blob> {
            self.0.get(key, range).await
        }
        async fn put(
            &self,
            key: &str,
            data: crate::store::ByteStream,
            ct: &str,
        ) -> crate::store::Result<u64> {
            self.0.put(key, data, ct).await
        }
        async fn head(&self, _: &str) -> crate::store::Result<Option<u64>> {
            Err(StoreError::backend("checking", "connection refused"))
        }
        async fn list_meta(
            &self,
            prefix: &str,
        ) -> crate::store::Result<Vec<crate::store::blobs::ObjectMeta>> {
            self.0.list_meta(prefix).await
        }
        async fn delete(&self, key: &str) -> crate::store::Result<()> {
            self.0.delete(key).await
        }
    }

    /// A store that cannot be asked is not a broken cache: fsck fails instead of reporting
    /// missing NARs, and repair removes nothing.
    #[tokio::test]
    async fn an_outage_is_an_error_not_a_finding() {
        let blobs = Arc::new(Down(MemoryBlobs::new()));
        put(&blobs.0, &format!("{A}.narinfo"), narinfo(A, "")).await;
        let opts = FsckOptions {
            jobs: 1,
            repair: true,
            ..Default::default()
        };
        let e = fsck(blobs.clone(), &opts).await.unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
        assert!(blobs
            .0
            .head(&format!("{A}.narinfo"))
            .await
            .unwrap()
            .is_some());
    }

    /// A cache whose objects break off after their first chunk, as a bucket that goes away
    /// mid-stream does.
    struct CutOff(MemoryBlobs);

    #[async_trait::async_trait]
    impl Blobs for CutOff {
        fn describe(&self) -> String {
            "cut off".into()
        }
        async fn get(
            &self,
            key: &str,
            range: Option<crate::store::ByteRange>,
        ) -> crate::store::Result<crate::store::Blob> {
            let mut blob = self.0.get(key, range).await?;
            if key.starts_with("nar/") {
                let cut = futures::stream::once(async {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "connection reset by peer",
                    ))
                });
                blob.stream = Box::pin(blob.stream.chain(cut));
            }
            Ok(blob)
        }
        async fn put(
            &self,
            key: &str,
            data: crate::store::ByteStream,
            ct: &str,
        ) -> crate::store::Result<u64> {
            self.0.put(key, data, ct).await
        }
        async fn head(&self, key: &str) -> crate::store::Result<Option<u64>> {
            self.0.head(key).await
        }
        async fn list_meta(
            &self,
            prefix: &str,
        ) -> crate::store::Result<Vec<crate::store::blobs::ObjectMeta>> {
            self.0.list_meta(prefix).await
        }
        async fn delete(&self, key: &str) -> crate::store::Result<()> {
            self.0.delete(key).await
        }
    }

    /// A NAR whose stream fails part-way is an outage, not a content mismatch: fsck fails,
    /// and repair removes nothing.
    #[tokio::test]
    async fn a_stream_that_breaks_off_is_an_error_not_a_finding() {
        let blobs = Arc::new(CutOff(MemoryBlobs::new()));
        put(&blobs.0, &format!("{A}.narinfo"), narinfo(A, "")).await;
        put(&blobs.0, &format!("nar/{A}.nar"), "nar".into()).await;
        let opts = FsckOptions {
            jobs: 1,
            verify_content: true,
            repair: true,
            ..Default::default()
        };
        let e = fsck(blobs.clone(), &opts).await.unwrap_err();
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert!(blobs
            .0
            .head(&format!("{A}.narinfo"))
            .await
            .unwrap()
            .is_some());
    }

    /// A narinfo for `digest` whose NAR is `nar` (hashed right), in a cache or source store.
    async fn object(blobs: &MemoryBlobs, digest: &str, refs: &str, nar: &str) {
        let hash = crate::formats::Hash::sha256_of(nar.as_bytes());
        let text = format!(
            "StorePath: /nix/store/{digest}-x\nURL: nar/{digest}.nar\nCompression: none\n\
             NarHash: {hash}\nNarSize: {}\nReferences: {refs}\n",
            nar.len()
        );
        put(blobs, &format!("{digest}.narinfo"), text).await;
        put(blobs, &format!("nar/{digest}.nar"), nar.into()).await;
    }

    /// A path whose NAR is gone and which references a path the cache lacks is written again
    /// from the store, its reference first; when the reference cannot be written (its NAR
    /// does not match its hash in the store), neither is the path, which is removed instead.
    #[tokio::test]
    async fn repair_writes_again_references_first_or_removes() {
        for reference_sound in [true, false] {
            let cache = Arc::new(MemoryBlobs::new());
            object(&cache, A, &format!("{B}-x"), "nar of a").await;
            cache.delete(&format!("nar/{A}.nar")).await.unwrap();
            let source = Arc::new(MemoryBlobs::new());
            object(&source, A, &format!("{B}-x"), "nar of a").await;
            object(&source, B, "", "nar of b").await;
            if !reference_sound {
                put(&source, &format!("nar/{B}.nar"), "not the nar of b".into()).await;
            }
            let opts = FsckOptions {
                jobs: 1,
                repair: true,
                from_store: Some(FromStore {
                    store: Arc::new(BinaryCache::new(source)),
                    publish: PublishOptions::default(),
                }),
                ..Default::default()
            };
            let report = fsck(cache.clone(), &opts).await.unwrap();
            let key = |d: &str| format!("{d}.narinfo");
            if reference_sound {
                assert_eq!(report.reuploaded, [key(B), key(A)]);
                assert!(report.removed.is_empty(), "{report:?}");
                let again = fsck(cache.clone(), &FsckOptions::default()).await.unwrap();
                assert!(again.is_clean(), "{again:?}");
            } else {
                assert!(report.reuploaded.is_empty(), "{report:?}");
                assert_eq!(report.removed, [key(A)]);
                assert!(cache.head(&key(B)).await.unwrap().is_none());
            }
        }
    }

    /// A store whose reads all fail, as one that is down.
    struct Unreachable;

    #[async_trait::async_trait]
    impl Blobs for Unreachable {
        fn describe(&self) -> String {
            "unreachable".into()
        }
        async fn get(
            &self,
            _: &str,
            _: Option<crate::store::ByteRange>,
        ) -> crate::store::Result<crate::store::Blob> {
            Err(StoreError::backend("reading", "connection refused"))
        }
        async fn put(
            &self,
            _: &str,
            _: crate::store::ByteStream,
            _: &str,
        ) -> crate::store::Result<u64> {
            Err(StoreError::backend("writing", "connection refused"))
        }
        async fn head(&self, _: &str) -> crate::store::Result<Option<u64>> {
            Err(StoreError::backend("checking", "connection refused"))
        }
        async fn list_meta(
            &self,
            _: &str,
        ) -> crate::store::Result<Vec<crate::store::blobs::ObjectMeta>> {
            Err(StoreError::backend("listing", "connection refused"))
        }
        async fn delete(&self, _: &str) -> crate::store::Result<()> {
            Err(StoreError::backend("deleting", "connection refused"))
        }
    }

    /// A store to write from that cannot be asked stops the repair: it may hold the path,
    /// so nothing is removed.
    #[tokio::test]
    async fn a_source_that_is_down_stops_the_repair() {
        let cache = Arc::new(MemoryBlobs::new());
        object(&cache, A, "", "nar of a").await;
        cache.delete(&format!("nar/{A}.nar")).await.unwrap();
        let opts = FsckOptions {
            jobs: 1,
            repair: true,
            from_store: Some(FromStore {
                store: Arc::new(BinaryCache::new(Arc::new(Unreachable))),
                publish: PublishOptions::default(),
            }),
            ..Default::default()
        };
        let e = fsck(cache.clone(), &opts).await.unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
        assert!(cache.head(&format!("{A}.narinfo")).await.unwrap().is_some());
    }

    /// A path whose reference is missing when the cache is listed, and whose writer finishes
    /// the closure before repair gets to it, is kept; left missing, it goes.
    #[tokio::test]
    async fn repair_looks_again_before_it_removes() {
        for writer_finishes in [true, false] {
            let blobs = Arc::new(MemoryBlobs::new());
            put(
                &blobs,
                &format!("{A}.narinfo"),
                narinfo(A, &format!("{B}-x")),
            )
            .await;
            put(&blobs, &format!("nar/{A}.nar"), "nar".into()).await;
            let opts = FsckOptions {
                jobs: 2,
                ..Default::default()
            };
            let report = fsck(blobs.clone(), &opts).await.unwrap();
            assert_eq!(report.count(FindingKind::DanglingReference), 1);
            if writer_finishes {
                put(&blobs, &format!("nar/{B}.nar"), "nar".into()).await;
                put(&blobs, &format!("{B}.narinfo"), narinfo(B, "")).await;
            }
            let cache = BinaryCache::new(blobs.clone());
            let digest = Digest::parse(A).unwrap();
            let graph = HashMap::from([(digest, vec![Digest::parse(B).unwrap()])]);
            let removed = repair(
                &cache,
                blobs.as_ref(),
                vec![digest],
                &graph,
                &HashMap::new(),
                &opts,
            )
            .await
            .unwrap()
            .removed;
            if writer_finishes {
                assert!(removed.is_empty(), "{removed:?}");
                assert!(blobs.head(&format!("{A}.narinfo")).await.unwrap().is_some());
            } else {
                assert_eq!(removed, [format!("{A}.narinfo")]);
                assert!(blobs.head(&format!("{A}.narinfo")).await.unwrap().is_none());
            }
        }
    }
}
