//! `upload`: an asynchronous pipeline that takes store paths from a FIFO and pushes their
//! closures into a binary cache, durably and in reference order.
//!
//! ```text
//! FIFO ──lines──► FifoReader ──Enqueue──► Scheduler ──Upload──► Uploader ×J ──► destination
//!                 (send().await:           (journal, closure,     (one arbiter
//!                  backpressure)            order, retries)        each)
//! ```

pub mod error;
pub mod input;
pub mod journal;
pub mod reader;
pub mod scheduler;
pub mod stats;
pub mod uploader;

use std::path::PathBuf;
use std::sync::Arc;

use actix::{Actor, Addr, Arbiter};
use tokio::sync::oneshot;

use crate::formats::StoreDir;
use crate::publish::PublishOptions;
use crate::shutdown::{Signal, StopSignals};
use crate::store::local::LocalStore;
use crate::store::Store;
pub use error::UploadError;
use journal::Journal;
use reader::{FifoReader, InputEnd, InputSpec, StopReading};
use scheduler::{Drain, Enqueue, Scheduler, SchedulerSettings, Summary};
use uploader::Uploader;

/// What an upload pipeline is made of, whatever feeds it paths.
pub struct PipelineConfig {
    /// The local store paths come from.
    pub source: Arc<LocalStore>,
    /// The destination cache.
    pub dest: Arc<dyn Store>,
    /// The journal file.
    pub journal: PathBuf,
    /// How objects are written.
    pub publish: PublishOptions,
    /// Write objects even when present.
    pub force: bool,
    /// Concurrent uploads.
    pub jobs: usize,
    /// Queue and retry settings.
    pub scheduler: SchedulerSettings,
    /// Where the pipeline publishes its totals (progress displays, `/metrics`).
    pub stats: Arc<stats::UploadStats>,
}

/// Everything an upload pipeline fed from a FIFO, file or standard input needs.
pub struct UploadConfig {
    /// The pipeline.
    pub pipeline: PipelineConfig,
    /// Where paths are read from.
    pub input: InputSpec,
}

/// A started pipeline, ready for paths: send it [`Enqueue`] messages (each answered once its
/// paths are durably accepted), then [`Drain`] to wait until all of them are uploaded.
pub struct Pipeline {
    /// The scheduler actor, the pipeline's only entry point.
    pub scheduler: Addr<Scheduler>,
    /// The journal, which holds every accepted path until its closure is uploaded.
    pub journal: Arc<Journal>,
    /// Paths an earlier run left unfinished, already enqueued again.
    pub resumed: usize,
}

/// Prepares the destination, opens the journal, starts `jobs` uploaders (each on an arbiter
/// of its own) and the scheduler in front of them, and re-enqueues whatever an earlier run
/// with the same journal left unfinished. Must run inside an actix system.
///
/// This is the part of [`run`] that does not depend on where paths come from, for programs
/// that produce paths themselves (see `examples/upload_from_code.rs`).
pub async fn start_pipeline(cfg: &PipelineConfig) -> Result<Pipeline, UploadError> {
    let store_dir: StoreDir = cfg.source.layout().store_dir.clone();
    match cfg.dest.prepare_for_upload(&store_dir).await {
        Ok(()) => {}
        // An unreachable destination is an outage, not a mistake: accept paths now (they are
        // journaled and retried) and keep trying to write nix-cache-info in the background.
        Err(e @ crate::store::StoreError::Backend { .. }) => {
            tracing::warn!("preparing {}: {e}; will keep trying", cfg.dest.describe());
            let (dest, dir) = (cfg.dest.clone(), store_dir.clone());
            actix::spawn(async move {
                let mut delay = std::time::Duration::from_secs(1);
                loop {
                    tokio::time::sleep(delay).await;
                    match dest.prepare_for_upload(&dir).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!("preparing {}: {e}; will keep trying", dest.describe())
                        }
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(60));
                }
            });
        }
        Err(source) => {
            return Err(UploadError::Prepare {
                dest: cfg.dest.describe(),
                source,
            })
        }
    }
    let journal = Arc::new(Journal::open(&cfg.journal)?);
    let source: Arc<dyn Store> = Arc::new(cfg.source.clone());
    let uploaders = (0..cfg.jobs.max(1))
        .map(|_| {
            let (s, d, p, f) = (
                source.clone(),
                cfg.dest.clone(),
                cfg.publish.clone(),
                cfg.force,
            );
            Uploader::start_in_arbiter(&Arbiter::new().handle(), move |_| Uploader::new(s, d, p, f))
        })
        .collect();
    let scheduler = Scheduler::new(
        cfg.source.clone(),
        journal.clone(),
        uploaders,
        cfg.scheduler.clone(),
        cfg.stats.clone(),
    )
    .start();

    let resumed = journal.pending()?;
    let n = resumed.len();
    if n > 0 {
        tracing::info!("resuming {n} paths left unfinished by an earlier run");
        // Queued now (so a Drain sent later waits for it) but not awaited: more pending paths
        // than the queue holds go in piece by piece as uploads finish, while the pipeline
        // already reads new input and answers signals.
        let resuming = scheduler.send(Enqueue(resumed));
        actix::spawn(async move {
            match resuming.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("resuming unfinished paths: {e}"),
                Err(e) => tracing::error!("resuming unfinished paths: {e}"),
            }
        });
    }
    Ok(Pipeline {
        scheduler,
        journal,
        resumed: n,
    })
}

/// How a pipeline ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Totals.
    pub summary: Summary,
    /// Why it stopped: `"end of input"`, `"finish marker"`, `"SIGHUP"`, `"SIGTERM"`, …
    pub reason: String,
    /// True when everything accepted was finished (not a prompt stop).
    pub drained: bool,
    /// An input error, if reading failed.
    pub input_error: Option<std::sync::Arc<UploadError>>,
}

/// Runs a pipeline inside an actix system until the input ends or a signal arrives.
///
/// End of input, the finish marker and SIGHUP drain: everything accepted is finished first.
/// SIGTERM and SIGINT stop promptly; unfinished work stays in the journal for the next start.
pub async fn run(cfg: UploadConfig) -> Result<Outcome, UploadError> {
    let mut signals = StopSignals::install().map_err(UploadError::Signals)?;
    let Pipeline {
        scheduler, journal, ..
    } = start_pipeline(&cfg.pipeline).await?;

    if let Some(spool) = &cfg.input.spool {
        // For `send --wait`, which follows its paths in the journal.
        if let Err(e) = journal::announce_journal(spool, &cfg.pipeline.journal) {
            tracing::warn!(
                "writing {}: {e}; `send --wait` cannot follow this uploader",
                spool.join(journal::JOURNAL_POINTER).display()
            );
        }
    }
    let (ended_tx, mut ended_rx) = oneshot::channel();
    let reader = FifoReader::new(cfg.input.clone(), scheduler.clone(), ended_tx).start();
    let ended = |end: Result<InputEnd, _>| match end.unwrap_or(InputEnd::Eof) {
        InputEnd::Eof => ("end of input".to_owned(), None),
        InputEnd::Finish => ("finish marker".to_owned(), None),
        InputEnd::Stopped => ("stopped".to_owned(), None),
        InputEnd::Error(e) => (format!("input error: {e}"), Some(Arc::new(e))),
    };
    let (reason, drain, input_error) = tokio::select! {
        end = &mut ended_rx => {
            let (reason, error) = ended(end);
            (reason, true, error)
        }
        sig = signals.recv() => (sig.to_string(), sig == Signal::Hup, None)
    };
    let mut input_error = input_error;
    if drain && !ended_rx.is_terminated() {
        // SIGHUP: lines writers already put in the pipe or the spool are accepted too (a
        // `send` that returned must not lose its paths to a drain that raced it).
        reader.do_send(StopReading { drain: true });
        tokio::select! {
            end = &mut ended_rx => input_error = ended(end).1,
            sig = signals.recv() => {
                tracing::info!("{sig}: stopping without finishing; unfinished paths stay queued");
                reader.do_send(StopReading { drain: false });
                return Ok(Outcome { summary: Summary::default(), reason: sig.to_string(), drained: false, input_error });
            }
        }
    } else {
        reader.do_send(StopReading { drain: false });
    }
    if !drain {
        tracing::info!(
            "{reason}: stopping now; unfinished paths stay queued in {}",
            cfg.pipeline.journal.display()
        );
        return Ok(Outcome {
            summary: Summary::default(),
            reason,
            drained: false,
            input_error,
        });
    }
    tracing::info!(
        "{reason}: finishing the {} accepted paths before exiting",
        journal.pending().map(|p| p.len()).unwrap_or(0)
    );
    // Drain is queued behind every Enqueue already accepted; a second signal stops at once.
    let summary = tokio::select! {
        s = scheduler.send(Drain) => s?,
        sig = signals.recv() => {
            tracing::info!("{sig}: stopping without finishing; unfinished paths stay queued");
            return Ok(Outcome { summary: Summary::default(), reason: sig.to_string(), drained: false, input_error });
        }
    };
    tracing::info!(
        "done: {} uploaded, {} already present, {} failed, {} bytes written",
        summary.uploaded,
        summary.present,
        summary.failed,
        summary.bytes
    );
    Ok(Outcome {
        summary,
        reason,
        drained: true,
        input_error,
    })
}
