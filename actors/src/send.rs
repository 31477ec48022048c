//! `send`: what a Nix post-build hook runs to queue paths for `upload`.
//!
//! Paths go to the FIFO one per line, packed into writes of at most 512 bytes (the smallest
//! `PIPE_BUF` POSIX allows) that never split a line, so concurrent hooks never interleave
//! mid-line. When the uploader made a spool folder next to the FIFO, the lines are first
//! written there durably, so a path `send` reports as sent survives an uploader crash even
//! while it still sits in the pipe.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::upload::journal::spool_dir;

/// Largest single write, and so the longest line that can be sent.
pub const MAX_WRITE: usize = 512;

/// The line `upload --allow-finish` stops at.
pub const FINISH_MARKER: &[u8] = b"\0\n";

/// Why `send` failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// An argument holds a NUL byte; nothing was sent.
    #[error("arg {0} contains a NUL byte")]
    Nul(usize),
    /// No paths and no `--finish`.
    #[error("requires at least 1 arg, only received 0")]
    NoPaths,
    /// The FIFO does not exist.
    #[error("{0} does not exist; start `nixcached upload --input {0}` (or create it with mkfifo) before sending")]
    Missing(PathBuf),
    /// Waiting for the uploader took longer than `--timeout`.
    #[error("timed out after {timeout:?} waiting for the uploader to read {path}{spooled}")]
    Timeout {
        /// The FIFO.
        path: PathBuf,
        /// The limit.
        timeout: Duration,
        /// Note on spooled paths.
        spooled: &'static str,
    },
    /// Some paths were refused; the others were sent.
    #[error("unable to send {0} output path{s}", s = if *.0 == 1 { "" } else { "s" })]
    Rejected(usize),
    /// `--wait`, but no uploader said where it journals the paths it reads.
    #[error(
        "--wait: no upload journal is named in {0}; start `nixcached upload --input FIFO` \
         (which names it there) before sending with --wait"
    )]
    NoJournal(PathBuf),
    /// `--wait`: some paths were given up on by the uploader.
    #[error("{failed} of the sent paths failed to upload, first {first}; see the upload log")]
    UploadFailed {
        /// How many failed.
        failed: usize,
        /// The first failed path and why.
        first: String,
    },
    /// `--wait`: not all paths were uploaded within `--timeout`.
    #[error(
        "timed out after {timeout:?} with {pending} sent paths not yet uploaded; they stay \
         queued and will still be uploaded"
    )]
    WaitTimeout {
        /// The limit.
        timeout: Duration,
        /// Paths not yet settled.
        pending: usize,
    },
    /// The operating system refused.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The writes to make, and the paths refused with the reason.
pub type Framed = (Vec<Vec<u8>>, Vec<(String, &'static str)>);

/// Packs paths into atomic writes; returns the writes and the paths refused (with reasons).
pub fn frame(paths: &[String], finish: bool) -> Result<Framed, SendError> {
    if let Some(i) = paths.iter().position(|p| p.contains('\0')) {
        return Err(SendError::Nul(i + 1));
    }
    let mut writes: Vec<Vec<u8>> = Vec::new();
    let mut rejected = Vec::new();
    let mut cur = Vec::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for p in paths {
        if p.contains('\n') {
            rejected.push((p.clone(), "contains newline"));
        } else if p.len() + 1 > MAX_WRITE {
            rejected.push((p.clone(), "too large"));
        } else {
            lines.push(format!("{p}\n").into_bytes());
        }
    }
    if finish {
        lines.push(FINISH_MARKER.to_vec());
    }
    for line in lines {
        if cur.len() + line.len() > MAX_WRITE {
            writes.push(std::mem::take(&mut cur));
        }
        cur.extend_from_slice(&line);
    }
    if !cur.is_empty() {
        writes.push(cur);
    }
    Ok((writes, rejected))
}

impl SendError {
    /// The exit code `send` ends with: 2 when an upload failed, 3 on a timeout, 1 otherwise,
    /// so a CI job can tell "not cached" from "not cached yet".
    pub fn exit_code(&self) -> u8 {
        match self {
            SendError::UploadFailed { .. } => 2,
            SendError::Timeout { .. } | SendError::WaitTimeout { .. } => 3,
            _ => 1,
        }
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SendError {
    let context = context.into();
    move |source| SendError::Io { context, source }
}

/// Writes the lines durably into the spool, if the uploader made one.
fn spool(output: &Path, writes: &[Vec<u8>]) -> Result<bool, SendError> {
    let dir = spool_dir(output);
    if !dir.is_dir() {
        return Ok(false);
    }
    let stamp = format!(
        "{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        std::process::id()
    );
    let tmp = dir.join(format!(".tmp-{stamp}"));
    let written = write_spool_file(&tmp, writes).and_then(|()| {
        std::fs::rename(&tmp, dir.join(&stamp)).map_err(io(format!("renaming {}", tmp.display())))
    });
    if let Err(e) = written {
        // A half-written file would never be read; leave nothing behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))?;
    Ok(true)
}

/// Writes and syncs one spool file.
fn write_spool_file(tmp: &Path, writes: &[Vec<u8>]) -> Result<(), SendError> {
    let mut f = std::fs::File::create(tmp).map_err(io(format!("writing {}", tmp.display())))?;
    for w in writes {
        // The finish marker is for the live pipe only; a spooled copy must not stop a later run.
        let data: Vec<u8> = w
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| *l != FINISH_MARKER)
            .flatten()
            .copied()
            .collect();
        f.write_all(&data)
            .map_err(io(format!("writing {}", tmp.display())))?;
    }
    f.sync_all()
        .map_err(io(format!("syncing {}", tmp.display())))
}

/// Sends paths (and the finish marker) to `output`, giving up after `timeout`.
pub fn send(
    output: &Path,
    paths: &[String],
    finish: bool,
    timeout: Option<Duration>,
) -> Result<(), SendError> {
    if paths.is_empty() && !finish {
        return Err(SendError::NoPaths);
    }
    let (writes, rejected) = frame(paths, finish)?;
    for (p, why) in &rejected {
        tracing::error!("cannot send {p:?}: {why}");
    }
    let meta = std::fs::metadata(output).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SendError::Missing(output.to_owned())
        } else {
            SendError::Io {
                context: format!("checking {}", output.display()),
                source: e,
            }
        }
    })?;
    let spooled = if meta.file_type().is_fifo() {
        // A spool that cannot be written (a full disk, say) must not stop the paths: they
        // still go through the pipe, only without the spool's durability.
        spool(output, &writes).unwrap_or_else(|e| {
            tracing::warn!(
                "{e}; sending through the FIFO only (the paths are lost if the uploader \
                 stops before reading them)"
            );
            false
        })
    } else {
        false
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let timed_out = || SendError::Timeout {
        path: output.to_owned(),
        timeout: timeout.unwrap_or_default(),
        spooled: if spooled {
            "; the paths are spooled and will be uploaded when it catches up"
        } else {
            ""
        },
    };
    let expired = || deadline.is_some_and(|d| Instant::now() >= d);
    let pause = || std::thread::sleep(Duration::from_millis(20));
    // Non-blocking, so that waiting for a reader or for room in the pipe honours --timeout.
    let mut f = loop {
        match std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(output)
        {
            Ok(f) => break f,
            // ENXIO: a FIFO with no reader yet.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if expired() {
                    return Err(timed_out());
                }
                pause();
            }
            Err(e) => return Err(io(format!("opening {}", output.display()))(e)),
        }
    };
    for w in &writes {
        loop {
            match f.write(w) {
                Ok(n) if n == w.len() => break,
                // Writes of at most PIPE_BUF are all-or-nothing on a pipe; a short write can
                // only happen on a regular file, where finishing it is safe.
                Ok(n) => {
                    f.write_all(&w[n..])
                        .map_err(io(format!("writing {}", output.display())))?;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if expired() {
                        return Err(timed_out());
                    }
                    pause();
                }
                Err(e) => return Err(io(format!("writing {}", output.display()))(e)),
            }
        }
        tracing::debug!("sent {}", String::from_utf8_lossy(w).trim_end());
    }
    if rejected.is_empty() {
        Ok(())
    } else {
        Err(SendError::Rejected(rejected.len()))
    }
}

/// How often `--wait` looks at the journal.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// Waits until the uploader reading `output` has settled every one of `paths` (its closure
/// in the destination, or given up on) at or after `since` (Unix seconds, taken before the
/// paths were sent), following the journal the uploader named in the spool folder. The
/// journal outlives the uploader, so a restart in between only delays the answer.
pub fn wait_uploaded(
    output: &Path,
    paths: &[String],
    since: i64,
    deadline: Option<(Instant, Duration)>,
) -> Result<(), SendError> {
    let spool = spool_dir(output);
    // Keyed as the uploader keys them: the path as written, less trailing slashes.
    let mut pending: Vec<&str> = paths.iter().map(|p| p.trim_end_matches('/')).collect();
    let mut failed: Vec<String> = Vec::new();
    // Opened once, and again only when a restarted uploader names another journal.
    let mut open: Option<(std::path::PathBuf, crate::upload::journal::Journal)> = None;
    loop {
        let named = crate::upload::journal::announced_journal(&spool)
            .filter(|j| j.is_file())
            .ok_or_else(|| SendError::NoJournal(spool.clone()))?;
        if open.as_ref().is_none_or(|(p, _)| *p != named) {
            let j = crate::upload::journal::Journal::open(&named).map_err(|e| SendError::Io {
                context: "--wait: reading the upload journal".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            open = Some((named, j));
        }
        let journal = &open.as_ref().expect("opened above").1;
        let mut still = Vec::new();
        for p in pending {
            match journal.settled_since(p, since) {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(why))) => failed.push(format!("{p}: {why}")),
                // Not there yet, or the journal is busy: look again.
                Ok(None) | Err(_) => still.push(p),
            }
        }
        pending = still;
        if pending.is_empty() {
            return match failed.first() {
                None => Ok(()),
                Some(first) => Err(SendError::UploadFailed {
                    failed: failed.len(),
                    first: first.clone(),
                }),
            };
        }
        if let Some((at, timeout)) = deadline {
            if Instant::now() >= at {
                return Err(SendError::WaitTimeout {
                    timeout,
                    pending: pending.len(),
                });
            }
        }
        std::thread::sleep(WAIT_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_packs_without_splitting_lines() {
        let paths: Vec<String> = (0..40).map(|i| format!("/nix/store/{i:032}-p")).collect();
        let (writes, rejected) = frame(&paths, true).unwrap();
        assert!(rejected.is_empty());
        assert!(writes
            .iter()
            .all(|w| w.len() <= MAX_WRITE && w.ends_with(b"\n")));
        let all: Vec<u8> = writes.concat();
        let expected: Vec<u8> = paths
            .iter()
            .flat_map(|p| format!("{p}\n").into_bytes())
            .chain(FINISH_MARKER.iter().copied())
            .collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            frame(&["a".into(), "b\0".into()], false),
            Err(SendError::Nul(2))
        ));
        let (w, r) = frame(&["ok".into(), "bad\nline".into(), "x".repeat(600)], false).unwrap();
        assert_eq!(w, vec![b"ok\n".to_vec()]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            SendError::Rejected(1).to_string(),
            "unable to send 1 output path"
        );
        assert_eq!(
            SendError::Rejected(2).to_string(),
            "unable to send 2 output paths"
        );
    }
}
