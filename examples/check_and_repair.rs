//! Checking, and repairing, a binary cache from code: the library call behind `nixcached fsck`.
//!
//! A maintenance job that already runs Rust can check its caches without a subprocess:
//! `fsck` lists the cache once, checks every narinfo (its NAR, its references, optionally
//! signatures and content) and returns a report; with `repair`, broken paths the local store
//! holds are written again from it (`from_store`, references first), and the narinfos of the
//! other broken paths and of their referrers are removed, referrers first, so the cache stays
//! consistent.
//!
//! Usage:
//!
//! ```sh
//! cargo run --example check_and_repair -- file:///tmp/cache
//! cargo run --example check_and_repair -- --repair --verify-content s3://bucket?region=eu-west-1
//! cargo run --example check_and_repair -- --repair --from-store /nix/store file:///tmp/cache
//! ```
//!
//! It prints one line per kind of finding and per narinfo written again or removed, and exits 0
//! when the cache is (now) consistent: nothing is broken, or repair dealt with what was. Orphan NARs
//! and unsigned paths do not make it fail. `tests/examples.rs` runs it.

use std::process::ExitCode;

use clap::Parser;
use nixcached_actors::fsck::{fsck, FindingKind, FromStore, FsckOptions};
use nixcached_actors::publish::PublishOptions;
use nixcached_actors::store::url::StoreUrl;

/// Check a binary cache, and optionally repair it.
#[derive(Debug, Parser)]
struct Args {
    /// Write broken paths again from --from-store, remove the narinfos of the others and of
    /// their referrers.
    #[arg(long)]
    repair: bool,
    /// The local Nix store to write broken paths again from (/nix/store, local?root=DIR).
    #[arg(long, requires = "repair")]
    from_store: Option<String>,
    /// Also stream every NAR and check its hashes.
    #[arg(long)]
    verify_content: bool,
    /// The cache: file:///DIR, s3://BUCKET[?…] or gs://BUCKET[?…].
    cache: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let blobs = match StoreUrl::parse(&args.cache).and_then(|u| u.open_blobs()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("check_and_repair: {}: {e}", args.cache);
            return ExitCode::from(2);
        }
    };
    // Any store serves as a source; a local Nix store is what `nixcached fsck` allows.
    let from_store = match args
        .from_store
        .as_deref()
        .map(|u| StoreUrl::parse(u)?.open())
    {
        None => None,
        Some(Ok(store)) => Some(FromStore {
            store,
            // Written as `nixcached upload` writes by default: zstd, with a listing, unsigned.
            publish: PublishOptions::default(),
        }),
        Some(Err(e)) => {
            eprintln!("check_and_repair: --from-store: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = FsckOptions {
        verify_content: args.verify_content,
        repair: args.repair,
        from_store,
        jobs: 8,
        ..Default::default()
    };
    let report = match fsck(blobs, &opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("check_and_repair: {}: {e}", args.cache);
            return ExitCode::from(2);
        }
    };
    println!(
        "{} narinfos, {} NAR files",
        report.narinfos, report.nar_files
    );
    for kind in FindingKind::ALL {
        println!("{kind}: {}", report.count(kind));
    }
    for key in &report.reuploaded {
        println!("reuploaded {key}");
    }
    for key in &report.removed {
        println!("removed {key}");
    }
    let broken = report
        .findings
        .iter()
        .filter(|f| f.kind.is_broken())
        .count();
    let repaired = !report.removed.is_empty() || !report.reuploaded.is_empty();
    if broken == 0 || (args.repair && repaired) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
