//! `nixcached fsck`: checks a binary cache and prints what is wrong (a table, or JSON).

use std::sync::Arc;

use anyhow::Context;
use nixcached_actors::formats::{Compression, PublicKey};
use nixcached_actors::fsck::{fsck, FindingKind, FromStore, FsckOptions, FsckReport};
use nixcached_actors::publish::PublishOptions;
use nixcached_actors::store::local::LocalStore;
use nixcached_actors::store::url::StoreUrl;
use thiserror::Error;

use crate::cli::{defaults, FsckArgs};

/// Why `fsck` did not exit 0.
#[derive(Debug, Error)]
pub enum FsckFailure {
    /// The cache was checked and has problems (the report says which).
    #[error("{count} problem(s) found in {cache}; the report above lists each")]
    Problems {
        /// How many.
        count: usize,
        /// The cache URL.
        cache: String,
    },
    /// The cache could not be checked at all.
    #[error("cannot check {cache}: {source:#}")]
    CannotCheck {
        /// The cache URL.
        cache: String,
        /// Why.
        source: anyhow::Error,
    },
}

impl FsckFailure {
    /// 1 for a cache with problems, 2 for a check that could not run, so scripts can tell
    /// "broken" from "unknown".
    pub fn exit_code(&self) -> u8 {
        match self {
            FsckFailure::Problems { .. } => 1,
            FsckFailure::CannotCheck { .. } => 2,
        }
    }
}

/// Runs `fsck`.
pub fn run(args: FsckArgs) -> anyhow::Result<()> {
    let cache = args.cache.clone();
    let report = check(&args).map_err(|source| FsckFailure::CannotCheck {
        cache: cache.clone(),
        source,
    })?;
    if args.json {
        // Written as it is serialized: a report of a million-object cache is large.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer_pretty(&mut out, &report)?;
        std::io::Write::write_all(&mut out, b"\n")?;
        std::io::Write::flush(&mut out)?;
    } else {
        print!("{}", table(&cache, &report, args.verify_content));
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(FsckFailure::Problems {
            count: report.findings.len(),
            cache,
        }
        .into())
    }
}

fn check(args: &FsckArgs) -> anyhow::Result<FsckReport> {
    let trusted_keys = args
        .trusted_public_keys
        .iter()
        .map(|k| {
            PublicKey::parse(k.trim()).with_context(|| {
                format!("trusted public key {k:?}: give it as NAME:BASE64, as in nix.conf's trusted-public-keys")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.jobs == 0 {
        anyhow::bail!("--jobs must be at least 1");
    }
    let blobs = StoreUrl::parse(&args.cache)?.open_blobs()?;
    let from_store = args
        .from_store
        .as_deref()
        .map(|url| from_store(url, args))
        .transpose()?;
    let opts = FsckOptions {
        verify_content: args.verify_content,
        trusted_keys,
        jobs: args.jobs,
        repair: args.repair,
        from_store,
        progress: None,
    };
    let (progress, _line) = crate::progress::PassLine::on_terminal("fsck");
    let opts = FsckOptions { progress, ..opts };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    Ok(rt.block_on(fsck(blobs, &opts))?)
}

/// Opens `--from-store` and reads the flags that say how paths are written again.
fn from_store(url: &str, args: &FsckArgs) -> anyhow::Result<FromStore> {
    let compression: Compression = args
        .compression
        .as_deref()
        .unwrap_or(defaults::COMPRESSION)
        .parse()
        .context("--compression")?;
    // The same store `upload --from` opens: only a local store holds paths to write again.
    let store = match StoreUrl::parse(url).with_context(|| format!("--from-store {url}"))? {
        StoreUrl::Local(layout) => {
            LocalStore::open(layout).with_context(|| format!("opening {url}"))?
        }
        _ => anyhow::bail!(
            "--from-store must name a local Nix store (/nix/store, local or local?root=DIR), not {url}"
        ),
    };
    Ok(FromStore {
        store: Arc::new(store),
        publish: PublishOptions {
            compression,
            level: args.compression_level,
            keys: crate::serve::read_keys(&args.secret_key_files)?,
            ..PublishOptions::default()
        },
    })
}

/// The report for a person: totals, a count per kind, then every finding.
fn table(cache: &str, r: &FsckReport, verified: bool) -> String {
    let mut s = format!(
        "{cache}: {} narinfos, {} NAR files{}\n",
        r.narinfos,
        r.nar_files,
        if verified {
            format!(", {} NAR bytes verified", r.verified_bytes)
        } else {
            String::new()
        }
    );
    s.push_str(&format!("{:<20} {:>8}\n", "problem", "count"));
    for kind in FindingKind::ALL {
        s.push_str(&format!("{:<20} {:>8}\n", kind.name(), r.count(kind)));
    }
    for f in &r.findings {
        s.push_str(&format!("{:<20} {}: {}\n", f.kind.name(), f.key, f.detail));
    }
    for key in &r.reuploaded {
        s.push_str(&format!("{:<20} {key}\n", "reuploaded"));
    }
    for key in &r.removed {
        s.push_str(&format!("{:<20} {key}\n", "removed"));
    }
    if !r.reuploaded.is_empty() {
        s.push_str(&format!(
            "repair wrote {} paths again, with their NARs\n",
            r.reuploaded.len()
        ));
    }
    if !r.removed.is_empty() {
        s.push_str(&format!(
            "repair removed {} narinfos; their NAR files stay until garbage collection\n",
            r.removed.len()
        ));
    }
    if r.is_clean() {
        s.push_str("no problems found\n");
    }
    s
}
