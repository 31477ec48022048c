//! Checking, and repairing, a binary cache from code: the library call behind `nixcached fsck`.
//!
//! A maintenance job that already runs Rust can check its caches without a subprocess:
//! `fsck` lists the cache once, checks every narinfo (its NAR, its references, optionally
//! signatures and content) and returns a report; with `repair`, the narinfos of broken paths
//! and of their referrers are removed, referrers first, so the cache stays consistent.
//!
//! Usage:
//!
//! ```sh
//! cargo run --example check_and_repair -- file:///tmp/cache
//! cargo run --example check_and_repair -- --repair --verify-content s3://bucket?region=eu-west-1
//! ```
//!
//! It prints one line per kind of finding and per removed narinfo, and exits 0 when the cache
//! is (now) consistent: nothing is broken, or repair removed everything that was. Orphan NARs
//! and unsigned paths do not make it fail. `tests/examples.rs` runs it.

use std::process::ExitCode;

use clap::Parser;
use nixcached_actors::fsck::{fsck, FindingKind, FsckOptions};
use nixcached_actors::store::url::StoreUrl;

/// Check a binary cache, and optionally repair it.
#[derive(Debug, Parser)]
struct Args {
    /// Remove the narinfos of broken paths and of their referrers.
    #[arg(long)]
    repair: bool,
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
    let opts = FsckOptions {
        verify_content: args.verify_content,
        repair: args.repair,
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
    for key in &report.removed {
        println!("removed {key}");
    }
    let broken = report
        .findings
        .iter()
        .filter(|f| f.kind.is_broken())
        .count();
    if broken == 0 || (args.repair && !report.removed.is_empty()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
