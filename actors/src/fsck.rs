//! `fsck`: what is wrong with a binary cache (a `file://` folder, an S3 or GCS bucket), read
//! from the cache alone, whoever wrote it (`nix copy`, Hydra, `upload`): no database.
//!
//! Every narinfo is read and parsed; its NAR must exist with the narinfo's `FileSize`; every
//! path it references must have a narinfo; with trusted keys, it must carry a signature by one;
//! with `verify_content`, the NAR is streamed and its `FileHash`, `NarHash` and `NarSize`
//! recomputed. NAR files no narinfo points at are orphans (an interrupted writer's, or what a
//! collection has not removed yet). Nothing is changed.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio_util::io::StreamReader;

use crate::formats::hash::HashingCounter;
use crate::formats::{Digest, NarInfo, PublicKey};
use crate::nar_files::MAX_DECODER_WINDOW;
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
/// Fails only when the cache cannot be listed or `nix-cache-info` is unreadable for a reason
/// other than its absence; everything wrong with single objects is a finding.
pub async fn fsck(blobs: Arc<dyn Blobs>, opts: &FsckOptions) -> Result<FsckReport, StoreError> {
    let cache = BinaryCache::new(blobs.clone());
    let digests: Vec<Digest> = cache.list().await?;
    let known: HashSet<Digest> = digests.iter().copied().collect();
    let nar_files: BTreeMap<String, ()> = blobs
        .list("nar/")
        .await?
        .into_iter()
        .map(|k| (k, ()))
        .collect();

    let checked: Vec<(Vec<Finding>, Option<String>, u64)> = futures::stream::iter(digests)
        .map(|d| check_one(&cache, blobs.as_ref(), d, &known, opts))
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;

    let mut report = FsckReport {
        narinfos: checked.len() as u64,
        nar_files: nar_files.len() as u64,
        ..Default::default()
    };
    let mut referenced = HashSet::new();
    for (findings, url, verified) in checked {
        report.findings.extend(findings);
        report.verified_bytes += verified;
        if let Some(u) = url {
            referenced.insert(u);
        }
    }
    for key in nar_files.keys() {
        if !referenced.contains(key) {
            report.findings.push(Finding {
                kind: FindingKind::OrphanNar,
                key: key.clone(),
                detail: "no narinfo points at this NAR file".into(),
            });
        }
    }
    report.findings.sort();
    Ok(report)
}

/// Checks one narinfo: its findings, its NAR's key, and the bytes verified.
async fn check_one(
    cache: &BinaryCache,
    blobs: &dyn Blobs,
    digest: Digest,
    known: &HashSet<Digest>,
    opts: &FsckOptions,
) -> (Vec<Finding>, Option<String>, u64) {
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
        Err(StoreError::NotFound(_)) => return (out, None, 0), // removed while we looked
        Err(e) => {
            finding(FindingKind::Unparsable, e.to_string());
            return (out, None, 0);
        }
    };
    for r in &info.references {
        if r.digest() != &digest && !known.contains(r.digest()) {
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
    match blobs.head(&info.url).await {
        Ok(None) => finding(
            FindingKind::MissingNar,
            format!("its NAR {} does not exist", info.url),
        ),
        Err(e) => finding(
            FindingKind::MissingNar,
            format!("its NAR {} cannot be read: {e}", info.url),
        ),
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
                match verify_content(cache, &info).await {
                    Ok(n) => verified = n,
                    Err(e) => finding(FindingKind::ContentMismatch, e),
                }
            }
        }
    }
    (out, Some(info.url.clone()), verified)
}

/// Streams the NAR of `info` once, hashing the file as stored and the NAR inside it; the bytes
/// read, or what does not match.
async fn verify_content(cache: &BinaryCache, info: &NarInfo) -> Result<u64, String> {
    let blob = cache
        .nar(&info.url, None)
        .await
        .map_err(|e| format!("its NAR {} cannot be read: {e}", info.url))?;
    let mut file_hash = HashingCounter::new();
    let raw = blob.stream.inspect_ok(|chunk| file_hash.update(chunk));
    let mut decoder = info.compression.decoder_within(
        tokio::io::BufReader::new(StreamReader::new(raw)),
        MAX_DECODER_WINDOW,
    );
    let mut nar_hash = HashingCounter::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = decoder
            .read(&mut buf)
            .await
            .map_err(|e| format!("its NAR {} does not decompress: {e}", info.url))?;
        if n == 0 {
            break;
        }
        nar_hash.update(&buf[..n]);
        // More than NarSize is wrong already; reading on would only cost time.
        if nar_hash.len() > info.nar_size {
            return Err(format!(
                "its NAR {} holds more than NarSize {} bytes",
                info.url, info.nar_size
            ));
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
    if wrong.is_empty() {
        Ok(file_size)
    } else {
        Err(format!("its NAR {}: {}", info.url, wrong.join("; ")))
    }
}
