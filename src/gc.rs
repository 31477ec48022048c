//! `nixcached gc` and `nixcached pin`: collect a binary cache, manage the pins it keeps.

use std::sync::Arc;

use anyhow::{bail, Context};
use nixcached_actors::access::read_access_records;
use nixcached_actors::formats::StorePath;
use nixcached_actors::gc::{gc, pin_add, pin_ls, pin_rm, GcOptions, GcReport};
use nixcached_actors::store::blobs::Blobs;
use nixcached_actors::store::url::StoreUrl;

use crate::cli::{GcArgs, PinCommand};

/// A store path as a user gives it: `/nix/store/…-name` or the base name.
fn store_path(s: &str) -> anyhow::Result<StorePath> {
    let base = s.trim().rsplit('/').next().unwrap_or(s);
    StorePath::from_base_name(base)
        .with_context(|| format!("{s:?} is not a store path (/nix/store/HASH-NAME)"))
}

fn open(cache: &str) -> anyhow::Result<Arc<dyn Blobs>> {
    Ok(StoreUrl::parse(cache)?.open_blobs()?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

/// Runs `gc`.
pub fn run(args: GcArgs) -> anyhow::Result<()> {
    if args.keep.is_empty() && args.max_age.is_none() && args.max_size.is_none() {
        bail!(
            "gc needs a retention policy: --keep FILE (store paths whose closures stay), \
             --max-age DURATION (what was uploaded or served since), --max-size SIZE (least \
             recently used go past it), or several; pins in the cache always stay, and \
             --max-age 0s keeps only them"
        );
    }
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let mut roots = Vec::new();
    for file in &args.keep {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading --keep {}", file.display()))?;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            roots.push(store_path(line).with_context(|| format!("in {}", file.display()))?);
        }
    }
    let mut served = std::collections::HashMap::new();
    for path in &args.access_records {
        for (d, t) in read_access_records(path)
            .with_context(|| "give --access-records the file or folder serve keeps them in")?
        {
            let e = served.entry(d).or_insert(t);
            *e = (*e).max(t);
        }
    }
    let opts = GcOptions {
        roots,
        max_age: args.max_age,
        max_size: args.max_size,
        served,
        grace: args.grace,
        dry_run: args.dry_run,
        jobs: args.jobs,
        progress: None,
    };
    let blobs = open(&args.cache)?;
    let (progress, line) = crate::progress::PassLine::on_terminal("gc");
    let opts = GcOptions { progress, ..opts };
    let report = runtime()?
        .block_on(gc(blobs, &opts))
        .with_context(|| format!("collecting {}", args.cache))?;
    drop(line);
    if args.json {
        // Written as it is serialized: a report of a million-object cache is large.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer_pretty(&mut out, &report)?;
        std::io::Write::write_all(&mut out, b"\n")?;
        std::io::Write::flush(&mut out)?;
    } else {
        print!("{}", summary(&args.cache, &report));
    }
    Ok(())
}

fn summary(cache: &str, r: &GcReport) -> String {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    let mut s = String::new();
    for k in r.removed_narinfos.iter().chain(&r.removed_files) {
        s.push_str(&format!("{verb} {k}\n"));
    }
    s.push_str(&format!(
        "{cache}: {} narinfos, {} bytes; {} kept, {} unreadable (left alone); {verb} {} narinfos and {} files, {} bytes; {} NAR/.ls files wait for the grace period\n",
        r.narinfos,
        r.total_bytes,
        r.kept,
        r.unreadable,
        r.removed_narinfos.len(),
        r.removed_files.len(),
        r.freed_bytes,
        r.deferred_files
    ));
    s
}

/// Runs `pin add|rm|ls`.
pub fn pin(cmd: PinCommand) -> anyhow::Result<()> {
    let rt = runtime()?;
    match cmd {
        PinCommand::Add { cache, name, paths } => {
            let paths = paths
                .iter()
                .map(|p| store_path(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            rt.block_on(pin_add(&open(&cache)?, &name, &paths))?;
        }
        PinCommand::Rm { cache, name } => rt.block_on(pin_rm(&open(&cache)?, &name))?,
        PinCommand::Ls { cache } => {
            for (name, paths) in rt.block_on(pin_ls(&open(&cache)?))? {
                println!("{name}");
                for p in paths {
                    println!("  {p}");
                }
            }
        }
    }
    Ok(())
}
