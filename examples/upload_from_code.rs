//! Uploading store paths, with their closures, into a binary cache from code.
//!
//! `nixcached upload` reads store paths from a FIFO that a Nix post-build hook writes to. A
//! program that already knows its paths (a CI job, a deployment tool) can leave the FIFO and
//! its reader out and talk to the pipeline's scheduler actor directly:
//!
//! ```text
//!  this program ──Enqueue(paths)──► Scheduler ──Upload(path)──► Uploader ×jobs ──► destination
//!               ──Drain───────────► (journal, closures,          (one arbiter,
//!               ◄─────────Summary──  reference order, retries)    i.e. thread, each)
//! ```
//!
//! Usage:
//!
//! ```sh
//! cargo run --example upload_from_code -- file:///tmp/cache /nix/store/…-hello
//! # paths of a chroot store (what `nix --store /tmp/chroot` makes):
//! cargo run --example upload_from_code -- --from 'local?root=/tmp/chroot' file:///tmp/cache /nix/store/…
//! ```
//!
//! It prints one summary line and exits 0 when every path's closure is in the destination,
//! 1 otherwise. `tests/examples.rs` runs it against the real Nix.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nixcached_actors::formats::Compression;
use nixcached_actors::publish::PublishOptions;
use nixcached_actors::store::local::LocalStore;
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::upload::scheduler::{Drain, Enqueue, SchedulerSettings};
use nixcached_actors::upload::stats::UploadStats;
use nixcached_actors::upload::{start_pipeline, PipelineConfig};

/// Upload store paths and their closures into a binary cache.
#[derive(Debug, Parser)]
struct Args {
    /// The local Nix store the paths are in: /nix/store, or local?root=DIR for a chroot store.
    #[arg(long, default_value = "/nix/store")]
    from: String,
    /// Objects uploaded at the same time.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// NAR compression: zstd, xz, bzip2, gzip, br or none.
    #[arg(long, default_value = "zstd")]
    compression: String,
    /// Durable queue file; with one, an interrupted run is finished by the next. Default: a
    /// temporary file, removed at exit.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Destination binary cache: file:///DIR (created when missing), s3://…, gs://…, ssh://….
    dest: String,
    /// Store paths to upload (each with its whole closure).
    #[arg(required = true)]
    paths: Vec<String>,
}

fn main() -> ExitCode {
    // The actors log what they do (retries, failures) through `tracing`.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("upload_from_code: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether everything was uploaded.
fn run(args: Args) -> Result<bool, String> {
    // The source must be a local store: the scheduler asks its database for each path's
    // closure, which it needs to upload references before the objects that refer to them.
    let source = match StoreUrl::parse(&args.from).map_err(|e| e.to_string())? {
        StoreUrl::Local(layout) => LocalStore::open(layout).map_err(|e| e.to_string())?,
        _ => return Err(format!("--from {}: not a local Nix store", args.from)),
    };
    // Paths are checked here so that a typo is an error, not a "failed" count in the summary.
    let store_dir = source.layout().store_dir.clone();
    for p in &args.paths {
        store_dir
            .parse_path(p.trim_end_matches('/'))
            .map_err(|e| format!("{p}: {e}"))?;
    }
    // An upload target folder is created when missing, as `nixcached upload` does.
    let dest = match StoreUrl::parse(&args.dest).map_err(|e| e.to_string())? {
        StoreUrl::File { dir, .. } => StoreUrl::File { dir, create: true },
        other => other,
    }
    .open()
    .map_err(|e| format!("{}: {e}", args.dest))?;

    // The journal is what makes accepted paths durable. Kept only for this run here; a
    // long-lived uploader keeps it (`nixcached upload` puts it in its state folder).
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let journal = args
        .journal
        .clone()
        .unwrap_or_else(|| scratch.path().join("journal.sqlite"));

    // What the pipeline has done so far, readable at any time (a UI could poll it).
    let stats = Arc::new(UploadStats::new(dest.describe()));
    let config = PipelineConfig {
        stats,
        source,
        dest,
        journal,
        publish: PublishOptions {
            compression: args
                .compression
                .parse::<Compression>()
                .map_err(|e| e.to_string())?,
            ..PublishOptions::default()
        },
        force: false,
        jobs: args.jobs.max(1),
        scheduler: SchedulerSettings {
            // The summary below says it all; no periodic progress lines.
            progress_every: std::time::Duration::ZERO,
            ..SchedulerSettings::default()
        },
    };
    let paths: Vec<String> = args
        .paths
        .iter()
        .map(|p| p.trim_end_matches('/').to_owned())
        .collect();

    // Actors need a running actix system; `block_on` runs it until the future ends.
    actix::System::new().block_on(async move {
        let pipeline = start_pipeline(&config).await.map_err(|e| e.to_string())?;
        if pipeline.resumed > 0 {
            println!("resumed {} paths from an earlier run", pipeline.resumed);
        }
        // One Enqueue for all paths. Its reply comes once the paths are committed to the
        // journal (not uploaded): a program producing paths over time sends one Enqueue per
        // batch and is slowed down by these replies when the queue is full (backpressure).
        pipeline
            .scheduler
            .send(Enqueue(paths))
            .await
            .map_err(|e| format!("scheduler: {e}"))?
            .map_err(|e| e.to_string())?;
        // Drain is answered once everything accepted before it is uploaded or given up on.
        let summary = pipeline
            .scheduler
            .send(Drain)
            .await
            .map_err(|e| format!("scheduler: {e}"))?;
        println!(
            "uploaded {}, already present {}, failed {}, {} bytes written",
            summary.uploaded, summary.present, summary.failed, summary.bytes
        );
        Ok(summary.failed == 0)
    })
}
