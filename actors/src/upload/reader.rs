//! The FIFO reader actor: reads store paths from a pipe, file or standard input and hands
//! them to the scheduler, one `send().await` at a time, so a busy scheduler stops it.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, WrapFuture,
};
use tokio::sync::{mpsc, oneshot};

use super::error::UploadError;
use super::input::{parse_line, LineSplitter, Parsed, Token, MAX_LINE};
use super::journal::read_spool;
use super::scheduler::{Enqueue, Scheduler};
use crate::formats::StoreDir;

/// Where paths come from.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// A file or FIFO; `None` for standard input.
    pub path: Option<PathBuf>,
    /// Open a FIFO read-write, so it never reaches end of input.
    pub keep_alive: bool,
    /// Stop at the finish marker.
    pub allow_finish: bool,
    /// The store directory paths must be in.
    pub store_dir: StoreDir,
    /// `send`'s durable spool for this FIFO, if any.
    pub spool: Option<PathBuf>,
}

/// How reading ended.
#[derive(Debug)]
pub enum InputEnd {
    /// End of file: every writer closed.
    Eof,
    /// The finish marker (with `--allow-finish`).
    Finish,
    /// Reading (or handing paths on) failed.
    Error(UploadError),
}

/// Stop reading (SIGHUP): what was accepted is still finished by the scheduler.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopReading;

/// The reader.
pub struct FifoReader {
    spec: InputSpec,
    scheduler: Addr<Scheduler>,
    ended: Option<oneshot::Sender<InputEnd>>,
}

impl FifoReader {
    /// A reader that reports how input ended through `ended`.
    pub fn new(
        spec: InputSpec,
        scheduler: Addr<Scheduler>,
        ended: oneshot::Sender<InputEnd>,
    ) -> FifoReader {
        FifoReader {
            spec,
            scheduler,
            ended: Some(ended),
        }
    }
}

/// Blocking reads on a thread of their own (opening a FIFO blocks until a writer comes),
/// handed over through a one-slot channel so the thread reads no further ahead than that.
fn spawn_reading_thread(spec: &InputSpec) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(1);
    let path = spec.path.clone();
    let keep_alive = spec.keep_alive;
    std::thread::Builder::new()
        .name("nixcached-input".into())
        .spawn(move || {
            let mut input: Box<dyn Read> = match &path {
                None => Box::new(std::io::stdin()),
                Some(p) => {
                    let mut o = std::fs::OpenOptions::new();
                    o.read(true);
                    if keep_alive {
                        // Holding a write end of our own means never seeing EOF.
                        o.write(true);
                    }
                    match o.open(p) {
                        Ok(f) => Box::new(f),
                        Err(e) => {
                            let _ = tx.blocking_send(Err(std::io::Error::new(
                                e.kind(),
                                format!("opening {}: {e}", p.display()),
                            )));
                            return;
                        }
                    }
                }
            };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        })
        .expect("spawn input thread");
    rx
}

fn paths_of(spec: &InputSpec, tokens: Vec<Token>) -> (Vec<String>, bool) {
    let mut paths = Vec::new();
    let mut finish = false;
    for t in tokens {
        match t {
            Token::Finish => finish = true,
            Token::Line(l) => match parse_line(&spec.store_dir, &l) {
                Parsed::Path(p) => paths.push(spec.store_dir.display(&p)),
                Parsed::Blank => {}
                Parsed::Skip(why) => tracing::warn!("{why}"),
            },
            Token::Oversized { start, len } => tracing::warn!(
                "skipping an input line of {len} bytes (at most {MAX_LINE}; store paths go \
                 one per line) starting {:?}",
                String::from_utf8_lossy(&start)
            ),
        }
    }
    (paths, finish)
}

async fn enqueue(scheduler: &Addr<Scheduler>, paths: Vec<String>) -> Result<(), UploadError> {
    if paths.is_empty() {
        return Ok(());
    }
    tracing::debug!("accepting {} paths", paths.len());
    scheduler.send(Enqueue(paths)).await?
}

/// Moves whatever `send` spooled into the scheduler, deleting spool files only after the
/// scheduler has committed their paths.
async fn ingest_spool(spec: &InputSpec, scheduler: &Addr<Scheduler>) -> Result<(), UploadError> {
    let Some(dir) = &spec.spool else {
        return Ok(());
    };
    let (lines, files) = read_spool(dir)?;
    if files.is_empty() {
        return Ok(());
    }
    let tokens = lines.into_iter().map(Token::Line).collect();
    let (paths, _) = paths_of(spec, tokens);
    enqueue(scheduler, paths).await?;
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    Ok(())
}

async fn read_loop(spec: InputSpec, scheduler: Addr<Scheduler>) -> InputEnd {
    if let Err(e) = ingest_spool(&spec, &scheduler).await {
        return InputEnd::Error(e);
    }
    let mut rx = spawn_reading_thread(&spec);
    let mut splitter = LineSplitter::new(spec.allow_finish);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let chunk = tokio::select! {
            c = rx.recv() => c,
            _ = tick.tick() => {
                if let Err(e) = ingest_spool(&spec, &scheduler).await {
                    return InputEnd::Error(e);
                }
                continue;
            }
        };
        let eof = chunk.is_none();
        let tokens = match chunk {
            None => splitter.finish(),
            Some(Err(source)) => {
                return InputEnd::Error(UploadError::Input {
                    path: spec.path.clone(),
                    source,
                })
            }
            Some(Ok(bytes)) => splitter.push(&bytes),
        };
        let (paths, finish) = paths_of(&spec, tokens);
        // The spool holds what `send` wrote durably; take it before acknowledging more.
        if let Err(e) = ingest_spool(&spec, &scheduler).await {
            return InputEnd::Error(e);
        }
        if let Err(e) = enqueue(&scheduler, paths).await {
            return InputEnd::Error(e);
        }
        if finish {
            return InputEnd::Finish;
        }
        if eof {
            return InputEnd::Eof;
        }
    }
}

impl Actor for FifoReader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let fut = read_loop(self.spec.clone(), self.scheduler.clone());
        ctx.spawn(fut.into_actor(self).map(|end, act, ctx| {
            if let Some(tx) = act.ended.take() {
                let _ = tx.send(end);
            }
            ctx.stop();
        }));
    }
}

impl Handler<StopReading> for FifoReader {
    type Result = ();

    fn handle(&mut self, _: StopReading, ctx: &mut Context<Self>) {
        // Dropping the read loop stops reading; the input thread ends with the process.
        ctx.stop();
    }
}
