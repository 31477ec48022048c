//! A `nix-store --serve` session over one ssh process: the handshake, then one request and
//! its answer at a time.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;

use super::error::SshError;
use super::process::SshProcess;
use super::target::SshTarget;
use super::wire::{self, Frame, HelloError, PathInfo};
use crate::formats::hash::HashingCounter;
use crate::formats::Hash;

/// Time allowed for ssh to log in and the remote `nix-store` to greet.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence tolerated while a request or a NAR is under way.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a request on a session failed, and what that means for the session.
#[derive(Debug)]
pub enum Failure {
    /// The request could not even be written: the session was already dead (ssh exited while
    /// idle). Nothing reached the server, so the request may be retried on a new session.
    Stale(SshError),
    /// The session broke or was abandoned mid-request; it must be dropped.
    Broken(SshError),
    /// The request failed on this side before anything was sent; the session is intact.
    NotSent(SshError),
}

impl Failure {
    /// The error, whatever the kind.
    pub fn into_error(self) -> SshError {
        match self {
            Failure::Stale(e) | Failure::Broken(e) | Failure::NotSent(e) => e,
        }
    }
}

/// A greeted serve session.
#[derive(Debug)]
pub struct Session {
    process: SshProcess,
    version: u64,
    /// When the session last finished a request, to retire long-idle ones.
    pub idle_since: Instant,
}

/// Runs `fut` with the stall limit; a timeout is an I/O error like any other broken pipe.
async fn stall<T>(fut: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(STALL_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress for {} s", STALL_TIMEOUT.as_secs()),
            ))
        })
}

impl Session {
    /// Starts ssh and greets the remote `nix-store --serve` (`--write` when `write`).
    pub async fn open(target: &SshTarget, rt: &Handle, write: bool) -> Result<Session, SshError> {
        let mut process = SshProcess::spawn(target, &target.serve_command(write), rt)?;
        let greeting = tokio::time::timeout(HELLO_TIMEOUT, async {
            process.stdin.write_all(wire::hello().bytes()).await?;
            process.stdin.flush().await?;
            wire::read_hello(&mut process.stdout).await
        })
        .await;
        let host = process.host().to_owned();
        match greeting {
            Ok(Ok(Ok(version))) => {
                tracing::debug!(
                    "ssh {host}: `{}` speaks serve protocol {}.{}",
                    target.serve_command(write),
                    version >> 8,
                    version & 0xff
                );
                Ok(Session {
                process,
                version,
                idle_since: Instant::now(),
                })
            }
            Ok(Ok(Err(HelloError::NotServe(seen)))) => Err(SshError::Protocol {
                host,
                detail: format!(
                    "expected `{} --serve` to answer, but got {:?}; does a shell start-up file on the remote host print text for non-interactive logins?",
                    target.remote_program,
                    String::from_utf8_lossy(&seen)
                ),
            }),
            Ok(Ok(Err(HelloError::Version(v)))) => Err(SshError::Protocol {
                host,
                detail: format!(
                    "the remote Nix speaks serve protocol {}.{}; nixcached needs 2.{} or newer; upgrade Nix there",
                    v >> 8,
                    v & 0xff,
                    wire::MIN_SERVER_MINOR
                ),
            }),
            Ok(Err(e)) => Err(process.failure(Some(&e)).await),
            Err(_) => Err(SshError::Timeout {
                host,
                secs: HELLO_TIMEOUT.as_secs(),
            }),
        }
    }

    /// True while the ssh process runs.
    pub fn is_alive(&mut self) -> bool {
        self.process.is_running()
    }

    /// `[user@]host`.
    pub fn host(&self) -> &str {
        self.process.host()
    }

    async fn broken(&mut self, e: io::Error) -> Failure {
        Failure::Broken(self.process.failure(Some(&e)).await)
    }

    /// Writes a request. A broken pipe here means ssh was gone before the request: stale.
    async fn send(&mut self, frame: &Frame) -> Result<(), Failure> {
        let sent = async {
            self.process.stdin.write_all(frame.bytes()).await?;
            self.process.stdin.flush().await
        };
        match stall(sent).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                Err(Failure::Stale(self.process.failure(Some(&e)).await))
            }
            Err(e) => Err(self.broken(e).await),
        }
    }

    /// Reads an answer; any failure breaks the session.
    async fn answer<'s, T, F>(&'s mut self, read: F) -> Result<T, Failure>
    where
        F: for<'r> FnOnce(
            &'r mut tokio::io::BufReader<tokio::process::ChildStdout>,
        ) -> futures::future::BoxFuture<'r, io::Result<T>>,
    {
        match stall(read(&mut self.process.stdout)).await {
            Ok(v) => {
                self.idle_since = Instant::now();
                Ok(v)
            }
            Err(e) => Err(self.broken(e).await),
        }
    }

    /// The valid ones among `paths`.
    pub async fn query_valid_paths(&mut self, paths: &[String]) -> Result<Vec<String>, Failure> {
        self.send(&wire::query_valid_paths(paths)).await?;
        self.answer(|r| Box::pin(wire::read_strings(r))).await
    }

    /// Metadata of the valid ones among `paths`.
    pub async fn query_path_infos(&mut self, paths: &[String]) -> Result<Vec<PathInfo>, Failure> {
        self.send(&wire::query_path_infos(paths)).await?;
        self.answer(|r| Box::pin(wire::read_path_infos(r))).await
    }

    /// Asks for the NAR of a valid path; the caller then reads exactly its size from
    /// [`Session::nar_reader`].
    pub async fn request_dump(&mut self, path: &str) -> Result<(), Failure> {
        self.send(&wire::dump_store_path(path)).await
    }

    /// Where a requested NAR arrives.
    pub fn nar_reader(&mut self) -> &mut (impl AsyncRead + Unpin) {
        &mut self.process.stdout
    }

    /// Explains an I/O failure while reading a NAR.
    pub async fn nar_failure(&mut self, e: &io::Error) -> SshError {
        self.process.failure(Some(e)).await
    }

    /// Adds a path to the remote store: its NAR (exactly `info.nar_size` bytes of `nar`) and
    /// metadata. Uses `AddToStoreNar` when the server has it and `legacy` is false, else
    /// `ImportPaths`. The server checks the NAR against `info.nar_hash` with `AddToStoreNar`;
    /// with `ImportPaths` it cannot, so the NAR is hashed here and the import abandoned (the
    /// session killed before the trailer) on a mismatch.
    pub async fn add_to_store<R: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        expected_hash: &Hash,
        nar: &mut R,
        legacy: bool,
    ) -> Result<(), Failure> {
        let modern = !legacy && wire::minor(self.version) >= wire::ADD_TO_STORE_NAR_MINOR;
        if modern {
            self.send(&wire::add_to_store_nar(info)).await?;
        } else {
            self.send(&wire::import_paths_head()).await?;
        }
        let mut counter = HashingCounter::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = info.nar_size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match nar.read(&mut buf[..want]).await {
                Ok(0) => {
                    return Err(Failure::Broken(SshError::BadNar(format!(
                        "the NAR for {} ends after {} bytes, but its narinfo says NarSize {}",
                        info.path,
                        info.nar_size - left,
                        info.nar_size
                    ))))
                }
                Ok(n) => n,
                Err(e) => {
                    return Err(Failure::Broken(SshError::Local {
                        context: format!("reading the NAR for {}", info.path),
                        source: e,
                    }))
                }
            };
            if !modern {
                counter.update(&buf[..n]);
            }
            if let Err(e) = stall(self.process.stdin.write_all(&buf[..n])).await {
                return Err(self.broken(e).await);
            }
            left -= n as u64;
        }
        if !modern {
            let (got, _) = counter.finish();
            if &got != expected_hash {
                return Err(Failure::Broken(SshError::BadNar(format!(
                    "the NAR for {} has hash {got}, but its narinfo says {expected_hash}",
                    info.path
                ))));
            }
            if let Err(e) = stall(
                self.process
                    .stdin
                    .write_all(wire::import_paths_tail(info).bytes()),
            )
            .await
            {
                return Err(self.broken(e).await);
            }
        }
        if let Err(e) = stall(self.process.stdin.flush()).await {
            return Err(self.broken(e).await);
        }
        let ack = self.answer(|r| Box::pin(wire::read_u64(r))).await?;
        if ack != 1 {
            return Err(Failure::Broken(SshError::Protocol {
                host: self.host().to_owned(),
                detail: format!(
                    "the server answered {ack} instead of 1 to adding {}",
                    info.path
                ),
            }));
        }
        Ok(())
    }
}
