//! The FIFO reader actor: reads store paths from a pipe, file or standard input and hands
//! them to the scheduler, one `send().await` at a time, so a busy scheduler stops it.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
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
    /// Stopped by [`StopReading`] with `drain`, after taking every line already written.
    Stopped,
}

/// Stop reading. With `drain` (SIGHUP), the reader first takes what writers already wrote
/// (the pipe's contents and the spool), hands it to the scheduler, and then reports
/// [`InputEnd::Stopped`]; without, it stops at once (what it had not accepted stays in the
/// spool, if `send` wrote one).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopReading {
    /// Take what was already written before stopping.
    pub drain: bool,
}

/// The reader.
pub struct FifoReader {
    spec: InputSpec,
    scheduler: Addr<Scheduler>,
    ended: Option<oneshot::Sender<InputEnd>>,
    stop: Option<oneshot::Sender<()>>,
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
            stop: None,
        }
    }
}

/// Most bytes read after a stop: what the pipe already held, bounded so that a writer that
/// never pauses cannot keep a stopping reader going forever (the kernel's largest pipe is
/// 1 MiB by default).
const STOP_READ_LIMIT: usize = 16 * 1024 * 1024;

/// Opens the input for the reading thread. A FIFO is opened without blocking (opening one
/// read-only would otherwise wait for a writer, deaf to a stop); `poll` then waits for the
/// first writer instead, and Linux reports hang-up only once a writer has come and gone.
fn open_input(path: &Option<PathBuf>, keep_alive: bool) -> std::io::Result<OwnedFd> {
    let Some(p) = path else {
        // Standard input is shared with whoever started us: read it without changing its flags.
        return std::io::stdin().as_fd().try_clone_to_owned();
    };
    let mut o = std::fs::OpenOptions::new();
    o.read(true).custom_flags(libc::O_NONBLOCK);
    if keep_alive {
        // Holding a write end of our own means never seeing end of input.
        o.write(true);
    }
    o.open(p)
        .map(OwnedFd::from)
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening {}: {e}", p.display())))
}

/// Waits until `fd` is readable or hung up, or until `stop` is (its write end dropped).
/// Returns true when told to stop.
fn wait_readable(fd: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> std::io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok(fds[1].revents != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// True when a read on `fd` would not block now.
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// What one read gave.
enum Got {
    Data(usize),
    End,
    Nothing,
}

fn read_some(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<Got> {
    loop {
        return match f.read(buf) {
            Ok(0) => Ok(Got::End),
            Ok(n) => Ok(Got::Data(n)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Got::Nothing),
            Err(e) => Err(e),
        };
    }
}

/// Blocking reads on a thread of their own, handed over through a one-slot channel so the
/// thread reads no further ahead than that. Dropping the returned stop handle tells the
/// thread to take what the input already holds (what writers wrote before the stop), hand
/// it over, and end; so a drain never leaves written lines behind in the pipe, where they
/// would vanish with the process.
fn spawn_reading_thread(
    spec: &InputSpec,
) -> std::io::Result<(mpsc::Receiver<std::io::Result<Vec<u8>>>, OwnedFd)> {
    let (tx, rx) = mpsc::channel(1);
    let mut ends = [0; 2];
    // SAFETY: `ends` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    let (stop_rx, stop_tx) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    let (path, keep_alive) = (spec.path.clone(), spec.keep_alive);
    std::thread::Builder::new()
        .name("nixcached-input".into())
        .spawn(move || {
            let fd = match open_input(&path, keep_alive) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            let mut f = std::fs::File::from(fd);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let stopping = match wait_readable(f.as_fd(), stop_rx.as_fd()) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                };
                if stopping {
                    break;
                }
                match read_some(&mut f, &mut buf) {
                    Ok(Got::Data(n)) => {
                        if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(Got::End) => return,
                    Ok(Got::Nothing) => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            // Stopping: take only what is there now, never waiting for more.
            let mut taken = 0;
            while taken < STOP_READ_LIMIT && readable_now(f.as_fd()) {
                match read_some(&mut f, &mut buf) {
                    Ok(Got::Data(n)) => {
                        taken += n;
                        if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(Got::End | Got::Nothing) => return,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        })?;
    Ok((rx, stop_tx))
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

/// Hands paths to the scheduler, which journals them before answering. A journal that
/// cannot take them now (a full disk, an I/O error) is retried until it can: the paths stay
/// held here, reading stops meanwhile, and writers wait on the full pipe (or spool).
async fn enqueue(scheduler: &Addr<Scheduler>, paths: Vec<String>) -> Result<(), UploadError> {
    if paths.is_empty() {
        return Ok(());
    }
    tracing::debug!("accepting {} paths", paths.len());
    let mut delay = Duration::from_millis(500);
    loop {
        match scheduler.send(Enqueue(paths.clone())).await? {
            Err(UploadError::Journal(e)) => {
                tracing::warn!(
                    "{} paths not accepted yet: {e}; retrying in {delay:?} (they are held \
                     until the journal can record them: free space in --state-dir)",
                    paths.len()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            done => return done,
        }
    }
}

/// The spool folder's reader, which says once (not every second) when the folder itself
/// cannot be read.
#[derive(Default)]
struct SpoolWatch {
    last_error: Option<String>,
}

impl SpoolWatch {
    /// Moves whatever `send` spooled into the scheduler, deleting spool files only after the
    /// scheduler has committed their paths. A spool folder that cannot be read is a warning,
    /// not the end of input: the FIFO still brings paths.
    async fn ingest(
        &mut self,
        spec: &InputSpec,
        scheduler: &Addr<Scheduler>,
    ) -> Result<(), UploadError> {
        let Some(dir) = &spec.spool else {
            return Ok(());
        };
        let (lines, files) = match read_spool(dir) {
            Ok(found) => {
                self.last_error = None;
                found
            }
            Err(e) => {
                let msg = e.to_string();
                if self.last_error.as_ref() != Some(&msg) {
                    tracing::warn!(
                        "{msg}; paths `send` spooled there wait until it can be read \
                         (the FIFO is still read)"
                    );
                    self.last_error = Some(msg);
                }
                return Ok(());
            }
        };
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
}

async fn read_loop(
    spec: InputSpec,
    scheduler: Addr<Scheduler>,
    mut stop: oneshot::Receiver<()>,
) -> InputEnd {
    let mut spool = SpoolWatch::default();
    if let Err(e) = spool.ingest(&spec, &scheduler).await {
        return InputEnd::Error(e);
    }
    let (mut rx, stop_thread) = match spawn_reading_thread(&spec) {
        Ok(r) => r,
        Err(source) => {
            return InputEnd::Error(UploadError::Input {
                path: spec.path.clone(),
                source,
            })
        }
    };
    // Dropped to tell the reading thread to stop (it then hands over what the pipe holds).
    let mut stop_thread = Some(stop_thread);
    let mut splitter = LineSplitter::new(spec.allow_finish);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let chunk = tokio::select! {
            c = rx.recv() => c,
            _ = tick.tick(), if stop_thread.is_some() => {
                if let Err(e) = spool.ingest(&spec, &scheduler).await {
                    return InputEnd::Error(e);
                }
                continue;
            }
            _ = &mut stop, if stop_thread.is_some() => {
                stop_thread = None;
                continue;
            }
        };
        let end = chunk.is_none();
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
        if let Err(e) = spool.ingest(&spec, &scheduler).await {
            return InputEnd::Error(e);
        }
        if let Err(e) = enqueue(&scheduler, paths).await {
            return InputEnd::Error(e);
        }
        if finish {
            return InputEnd::Finish;
        }
        if end {
            return if stop_thread.is_none() {
                InputEnd::Stopped
            } else {
                InputEnd::Eof
            };
        }
    }
}

impl Actor for FifoReader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (stop_tx, stop_rx) = oneshot::channel();
        self.stop = Some(stop_tx);
        let fut = read_loop(self.spec.clone(), self.scheduler.clone(), stop_rx);
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

    fn handle(&mut self, msg: StopReading, ctx: &mut Context<Self>) {
        match self.stop.take() {
            // The read loop finishes what was written, then reports and stops the actor.
            Some(stop) if msg.drain => {
                let _ = stop.send(());
            }
            // Dropping the read loop drops the thread's stop handle: the thread ends too.
            _ => ctx.stop(),
        }
    }
}
