//! `nixcached upload`: turns flags into an [`UploadConfig`] and runs the pipeline.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use nixcached_actors::formats::{Compression, Hash};
use nixcached_actors::publish::PublishOptions;
use nixcached_actors::store::local::LocalStore;
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::upload::journal::spool_dir;
use nixcached_actors::upload::reader::InputSpec;
use nixcached_actors::upload::scheduler::SchedulerSettings;
use nixcached_actors::upload::stats::UploadStats;
use nixcached_actors::upload::{PipelineConfig, UploadConfig};

use crate::cli::UploadArgs;

/// The state folder when none is given: `$STATE_DIRECTORY` (systemd), else
/// `$XDG_STATE_HOME/nixcached`, else `~/.local/state/nixcached`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        // systemd's StateDirectory= may list several; the first is ours.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        return PathBuf::from(first);
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("nixcached")
}

/// Turns flags into a pipeline configuration (opens the stores, prepares the spool).
pub fn prepare(args: &UploadArgs) -> anyhow::Result<UploadConfig> {
    let compression: Compression = args.compression.parse()?;
    let source =
        match StoreUrl::parse(&args.from).with_context(|| format!("--from {}", args.from))? {
            StoreUrl::Local(layout) => {
                LocalStore::open(layout).with_context(|| format!("opening {}", args.from))?
            }
            _ => bail!(
                "--from must name a local Nix store (/nix/store or local?root=DIR), not {}",
                args.from
            ),
        };
    let dest_url = match StoreUrl::parse(&args.dest).with_context(|| format!("destination {}", args.dest))? {
        StoreUrl::File { dir, .. } => StoreUrl::File { dir, create: true },
        StoreUrl::Local(_) => bail!(
            "the destination {} is a local Nix store; upload writes binary caches: file:///DIR, s3://, gs:// or ssh://",
            args.dest
        ),
        other => other,
    };
    let dest = dest_url
        .open()
        .with_context(|| format!("opening destination {}", args.dest))?;
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let journal = state_dir.join(format!(
        "upload-{}.sqlite",
        &Hash::sha256_of(args.dest.as_bytes()).to_sri()[7..19].replace(['/', '+'], "_")
    ));
    let spool = match &args.input {
        Some(p) if std::fs::metadata(p).is_ok_and(|m| m.file_type().is_fifo()) => {
            let d = spool_dir(p);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("creating the spool folder {}", d.display()))?;
            Some(d)
        }
        _ => None,
    };
    let stats = Arc::new(UploadStats::new(dest.describe()));
    Ok(UploadConfig {
        input: InputSpec {
            path: args.input.clone(),
            keep_alive: args.keep_alive,
            allow_finish: args.allow_finish,
            store_dir: source.layout().store_dir.clone(),
            spool,
        },
        pipeline: PipelineConfig {
            stats,
            source: Arc::clone(&source),
            dest,
            journal,
            publish: PublishOptions {
                compression,
                level: args.compression_level,
                write_listing: args.write_nar_listing,
                write_logs: args.write_build_logs,
                keys: crate::serve::read_keys(&args.secret_key_files)?,
            },
            force: args.force,
            jobs: args.jobs as usize,
            scheduler: SchedulerSettings {
                queue_bound: args.queue_size as usize,
                progress_every: args.progress_interval,
                ..SchedulerSettings::default()
            },
        },
    })
}

/// Runs `upload`.
pub fn run(args: UploadArgs) -> anyhow::Result<()> {
    let mut cfg = prepare(&args)?;
    // On a terminal, one live line instead of periodic progress log lines.
    let live = (std::io::IsTerminal::is_terminal(&std::io::stderr())
        && !cfg.pipeline.scheduler.progress_every.is_zero())
    .then(|| {
        cfg.pipeline.scheduler.progress_every = std::time::Duration::ZERO;
        crate::progress::Progress::show(cfg.pipeline.stats.clone())
    });
    let outcome = actix::System::new().block_on(nixcached_actors::upload::run(cfg));
    drop(live);
    let outcome = outcome?;
    if let Some(e) = outcome.input_error {
        bail!("{e}");
    }
    Ok(())
}
