//! One `ssh` child process running one remote command, with its pipes, and the tail of its
//! stderr kept for error messages.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::error::{classify, SshError};
use super::target::SshTarget;

/// How much of stderr is kept: enough for the last lines of any error.
const STDERR_TAIL: usize = 8 * 1024;
/// How long a failed ssh gets to exit by itself, so its status and last words are known.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the rest of stderr once ssh has exited. It can stay open longer than
/// ssh lives (a `ControlPersist` master inherits it), so this is bounded.
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// A running `ssh … REMOTE_COMMAND`.
#[derive(Debug)]
pub struct SshProcess {
    /// The child; killed when dropped.
    child: Child,
    /// Its stdin (the remote command's stdin).
    pub stdin: BufWriter<ChildStdin>,
    /// Its stdout (the remote command's stdout).
    pub stdout: BufReader<ChildStdout>,
    tail: Arc<Mutex<Vec<u8>>>,
    drain: Option<JoinHandle<()>>,
    /// `[user@]host`, for messages.
    host: String,
    /// The remote program, to recognise "command not found".
    program: String,
}

/// The `NIX_SSHOPTS` of this process, read at each connection like Nix does.
fn nix_sshopts() -> String {
    std::env::var("NIX_SSHOPTS").unwrap_or_default()
}

impl SshProcess {
    /// Starts `ssh` for `remote_command`. Its pipes are registered with `rt`, a runtime that
    /// lives as long as the store, so a process outlives the task (and runtime) that asked
    /// for it: a pooled connection may be used later from anywhere.
    pub fn spawn(target: &SshTarget, remote_command: &str, rt: &Handle) -> Result<Self, SshError> {
        let _in_runtime = rt.enter();
        let mut child = Command::new("ssh")
            .args(target.ssh_args(&nix_sshopts(), remote_command))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(SshError::SshMissing)?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(SshError::SshMissing(io::Error::other(
                "ssh was started without pipes",
            )));
        };
        let tail = Arc::new(Mutex::new(Vec::new()));
        let keep = tail.clone();
        let host = target.destination();
        let who = host.clone();
        // stderr must be drained continuously: a full pipe would stall the remote command.
        let drain = rt.spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match stderr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        for line in text.lines().filter(|l| !l.trim().is_empty()) {
                            tracing::debug!("ssh {who}: {line}");
                        }
                        let mut t = keep.lock().unwrap_or_else(|p| p.into_inner());
                        t.extend_from_slice(&buf[..n]);
                        if t.len() > STDERR_TAIL {
                            let cut = t.len() - STDERR_TAIL;
                            t.drain(..cut);
                        }
                    }
                }
            }
        });
        Ok(SshProcess {
            child,
            stdin: BufWriter::new(stdin),
            stdout: BufReader::with_capacity(64 * 1024, stdout),
            tail,
            drain: Some(drain),
            host,
            program: target.remote_program.clone(),
        })
    }

    /// `[user@]host`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// True while ssh runs; a connection whose ssh exited (killed, network gone) is useless.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for ssh to exit on its own, with its full stdout read by the caller; returns the
    /// status and stderr. For one-shot commands.
    pub async fn finish(&mut self) -> (Option<ExitStatus>, String) {
        let status = self.child.wait().await.ok();
        (status, self.stderr().await)
    }

    /// Collects what stderr still has to say (bounded wait) and returns the kept tail.
    async fn stderr(&mut self) -> String {
        if let Some(d) = self.drain.take() {
            let _ = tokio::time::timeout(STDERR_GRACE, d).await;
        }
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t).into_owned()
    }

    /// Explains why the process stopped serving: waits briefly for ssh to exit, then reads its
    /// status and stderr. Kills it when it does not exit by itself. `cause` is the local I/O
    /// error that revealed the failure.
    pub async fn failure(&mut self, cause: Option<&io::Error>) -> SshError {
        let status = match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                let _ = self.child.start_kill();
                None
            }
        };
        let stderr = self.stderr().await;
        classify(&self.host, &self.program, status, &stderr, cause)
    }
}
