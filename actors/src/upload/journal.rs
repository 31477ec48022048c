//! The durable queue of `upload`: every accepted store path is committed to a SQLite
//! journal before it is acknowledged, and stays there until its whole closure is in the
//! destination, so a crash or restart resumes where it stopped.
//!
//! The spool is how `send` hands over paths durably: it writes (and fsyncs) a file into
//! `<FIFO>.spool/` before writing to the FIFO itself, so a path `send` reported as sent
//! survives even when the uploader is killed while the bytes are still in the pipe.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection};

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite failed.
    #[error("upload journal {path}: {source} (check that --state-dir is writable)")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// Spool files could not be read or removed.
    #[error("spool {path}: {source}")]
    Spool {
        /// The spool folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where a path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Accepted, not yet fully uploaded.
    Pending,
    /// It and its closure are in the destination.
    Done,
    /// Gave up: the error is recorded.
    Failed,
}

impl State {
    fn code(self) -> i64 {
        match self {
            State::Pending => 0,
            State::Done => 1,
            State::Failed => 2,
        }
    }

    fn from_code(c: i64) -> State {
        match c {
            0 => State::Pending,
            1 => State::Done,
            _ => State::Failed,
        }
    }
}

/// One path's record in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where it stands.
    pub state: State,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Failures of it or its closure that were retried since it was (last) sent.
    pub retries: i64,
    /// The last of those failures.
    pub last_error: Option<String>,
    /// When it was last accepted or settled (Unix seconds).
    pub updated: i64,
}

/// The journal of one upload pipeline.
pub struct Journal {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({})", self.path.display())
    }
}

impl Journal {
    /// Opens (creating) the journal file.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let err = |source| JournalError::Db {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| JournalError::Spool {
                path: dir.to_owned(),
                source: e,
            })?;
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS paths (
                 path TEXT PRIMARY KEY,
                 state INTEGER NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 error TEXT,
                 updated INTEGER NOT NULL
             );",
        )
        .map_err(err)?;
        // Journals from before retries were recorded gain the two columns.
        let has_retries: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('paths') WHERE name = 'retries'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(err)?
            > 0;
        if !has_retries {
            conn.execute_batch(
                "ALTER TABLE paths ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE paths ADD COLUMN last_error TEXT;",
            )
            .map_err(err)?;
        }
        Ok(Journal {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, source: rusqlite::Error) -> JournalError {
        JournalError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Commits paths as pending (again, if they were done or failed: a path sent again is
    /// checked again). Returns once the commit is on disk.
    pub fn add(&self, paths: &[String]) -> Result<(), JournalError> {
        let mut conn = self.conn.lock().expect("journal");
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO paths (path, state, updated) VALUES (?1, 0, strftime('%s','now'))
                     ON CONFLICT(path) DO UPDATE SET state = 0, retries = 0, last_error = NULL,
                         updated = excluded.updated WHERE state != 0",
                )
                .map_err(|e| self.err(e))?;
            for p in paths {
                stmt.execute(params![p]).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records a final state.
    pub fn set(&self, path: &str, state: State, error: Option<&str>) -> Result<(), JournalError> {
        self.conn
            .lock()
            .expect("journal")
            .execute(
                "UPDATE paths SET state = ?2, error = ?3, attempts = attempts + 1, updated = strftime('%s','now') WHERE path = ?1",
                params![path, state.code(), error],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Records a failure that will be retried (the destination failed for now), so the
    /// journal tells how a path got through a fault, not only that it did.
    pub fn note_retry(&self, path: &str, error: &str) -> Result<(), JournalError> {
        self.conn
            .lock()
            .expect("journal")
            .execute(
                "UPDATE paths SET retries = retries + 1, last_error = ?2 WHERE path = ?1 AND state = 0",
                params![path, error],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Everything the journal says about one path, if it was accepted.
    pub fn entry(&self, path: &str) -> Result<Option<Entry>, JournalError> {
        let conn = self.conn.lock().expect("journal");
        let r = conn.query_row(
            "SELECT state, error, retries, last_error, updated FROM paths WHERE path = ?1",
            params![path],
            |r| {
                Ok(Entry {
                    state: State::from_code(r.get(0)?),
                    error: r.get(1)?,
                    retries: r.get(2)?,
                    last_error: r.get(3)?,
                    updated: r.get(4)?,
                })
            },
        );
        match r {
            Ok(e) => Ok(Some(e)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Paths accepted earlier and not finished: the work to resume.
    pub fn pending(&self) -> Result<Vec<String>, JournalError> {
        let conn = self.conn.lock().expect("journal");
        let mut stmt = conn
            .prepare("SELECT path FROM paths WHERE state = 0 ORDER BY updated, path")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get(0))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| self.err(e));
        rows
    }

    /// Where `path` stands if it was accepted or settled at or after `since` (Unix seconds):
    /// `None` while it is unknown or pending, else `Ok` (done) or `Err` with the reason it
    /// failed. A path settled before `since` counts as unknown: it was sent again.
    pub fn settled_since(
        &self,
        path: &str,
        since: i64,
    ) -> Result<Option<Result<(), String>>, JournalError> {
        Ok(match self.entry(path)? {
            Some(e) if e.updated >= since => match e.state {
                State::Pending => None,
                State::Done => Some(Ok(())),
                State::Failed => Some(Err(e.error.unwrap_or_default())),
            },
            _ => None,
        })
    }
}

/// The file in a spool folder that names the journal of the `upload` reading the FIFO, so
/// `send --wait` can follow its paths (the leading dot keeps it out of spool reads).
pub const JOURNAL_POINTER: &str = ".journal";

/// Says, in the spool folder, which journal records the paths read from its FIFO.
pub fn announce_journal(spool: &Path, journal: &Path) -> std::io::Result<()> {
    let journal = std::path::absolute(journal)?;
    let tmp = spool.join(format!(".journal-{}", std::process::id()));
    std::fs::write(&tmp, journal.as_os_str().as_encoded_bytes())?;
    std::fs::rename(&tmp, spool.join(JOURNAL_POINTER))
}

/// The journal named in a spool folder, if an `upload` announced one.
pub fn announced_journal(spool: &Path) -> Option<PathBuf> {
    let bytes = std::fs::read(spool.join(JOURNAL_POINTER)).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    Some(PathBuf::from(text))
}

/// The spool folder `send` writes to for a given FIFO.
pub fn spool_dir(fifo: &Path) -> PathBuf {
    let mut s = fifo.as_os_str().to_owned();
    s.push(".spool");
    PathBuf::from(s)
}

/// Largest spool file read. `send` writes one file per call, a few hundred bytes per path;
/// anything larger did not come from it and is set aside rather than read into memory.
pub const MAX_SPOOL_FILE: u64 = 64 << 20;

/// Where spool entries that are not `send`'s files are moved, inside the spool folder (its
/// leading dot keeps it out of later reads).
pub const REJECTED: &str = ".rejected";

/// Reads every complete spool file: returns their lines and the files to delete once the
/// lines are committed. Temporary files (still being written by `send`) are left alone.
///
/// Anything else found there (a directory, FIFO, socket, symbolic link, an unreadable or
/// oversized file) is moved into [`REJECTED`] with a warning: it holds no paths `send`
/// wrote, and reading it could block (a FIFO), follow a link out of the folder, or take
/// unbounded memory. Nothing is deleted that was not read.
pub fn read_spool(dir: &Path) -> Result<(Vec<Vec<u8>>, Vec<PathBuf>), JournalError> {
    use std::os::unix::ffi::OsStrExt;
    let err = |source| JournalError::Spool {
        path: dir.to_owned(),
        source,
    };
    let mut lines = Vec::new();
    let mut files = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((lines, files)),
        Err(e) => return Err(err(e)),
    };
    let mut entries: Vec<PathBuf> = Vec::new();
    for e in rd {
        let e = e.map_err(err)?;
        if !e.file_name().as_bytes().starts_with(b".") {
            entries.push(e.path());
        }
    }
    entries.sort();
    for p in entries {
        match read_spool_file(&p) {
            Ok(data) => {
                lines.extend(
                    data.split(|&b| b == b'\n')
                        .filter(|l| !l.is_empty())
                        .map(<[u8]>::to_vec),
                );
                files.push(p);
            }
            // Gone since the listing: `upload` of another process took it.
            Err(SpoolEntry::Gone) => {}
            Err(SpoolEntry::Odd(why)) => set_aside(dir, &p, &why),
        }
    }
    Ok((lines, files))
}

/// Why a spool entry was not read.
enum SpoolEntry {
    Gone,
    Odd(String),
}

/// Reads one spool file, refusing anything but a regular file of bounded size; never
/// blocks (a FIFO is opened non-blocking) and never follows a symbolic link.
fn read_spool_file(p: &Path) -> Result<Vec<u8>, SpoolEntry> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p);
    let f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SpoolEntry::Gone),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(SpoolEntry::Odd("a symbolic link".into()))
        }
        Err(e) => return Err(SpoolEntry::Odd(format!("unreadable ({e})"))),
    };
    let meta = f
        .metadata()
        .map_err(|e| SpoolEntry::Odd(format!("unreadable ({e})")))?;
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        None
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_socket() {
        Some("a socket")
    } else {
        Some("a device or other special file")
    };
    if let Some(kind) = kind {
        return Err(SpoolEntry::Odd(kind.into()));
    }
    if meta.len() > MAX_SPOOL_FILE {
        return Err(SpoolEntry::Odd(format!(
            "{} bytes, more than `send` ever writes ({MAX_SPOOL_FILE})",
            meta.len()
        )));
    }
    let mut data = Vec::new();
    f.take(MAX_SPOOL_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| SpoolEntry::Odd(format!("unreadable ({e})")))?;
    if data.len() as u64 > MAX_SPOOL_FILE {
        return Err(SpoolEntry::Odd(format!(
            "more than `send` ever writes ({MAX_SPOOL_FILE} bytes)"
        )));
    }
    Ok(data)
}

/// Moves an odd spool entry into the [`REJECTED`] folder, saying so.
fn set_aside(dir: &Path, p: &Path, why: &str) {
    let rejected = dir.join(REJECTED);
    let name = p.file_name().unwrap_or_default();
    let mut to = rejected.join(name);
    for i in 1.. {
        if std::fs::symlink_metadata(&to).is_err() {
            break;
        }
        let mut n = name.to_owned();
        n.push(format!(".{i}"));
        to = rejected.join(n);
    }
    match std::fs::create_dir_all(&rejected).and_then(|()| std::fs::rename(p, &to)) {
        Ok(()) => tracing::warn!(
            "spool: {} is {why}, not a file `send` wrote; moved it to {} (nothing in it was uploaded)",
            p.display(),
            to.display()
        ),
        Err(e) => tracing::warn!(
            "spool: {} is {why}, not a file `send` wrote, and could not be moved to {}: {e}; \
             remove it from the spool folder",
            p.display(),
            rejected.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_survives_reopen_and_states_update() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.sqlite");
        let j = Journal::open(&p).unwrap();
        j.add(&["/nix/store/a".into(), "/nix/store/b".into()])
            .unwrap();
        j.set("/nix/store/a", State::Done, None).unwrap();
        drop(j);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.pending().unwrap(), vec!["/nix/store/b".to_string()]);
        j.add(&["/nix/store/a".into()]).unwrap();
        assert_eq!(
            j.pending().unwrap().len(),
            2,
            "a re-sent path is pending again"
        );
        j.set("/nix/store/b", State::Failed, Some("gone")).unwrap();
        let b = j.entry("/nix/store/b").unwrap().unwrap();
        assert_eq!((b.state, b.error), (State::Failed, Some("gone".into())));
    }

    #[test]
    fn retries_are_recorded_kept_when_done_and_reset_when_sent_again() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.sqlite");
        // A journal written before retries were recorded opens and gains the columns.
        let old = Connection::open(&p).unwrap();
        old.execute_batch(
            "CREATE TABLE paths (path TEXT PRIMARY KEY, state INTEGER NOT NULL,
             attempts INTEGER NOT NULL DEFAULT 0, error TEXT, updated INTEGER NOT NULL);
             INSERT INTO paths VALUES ('/nix/store/old', 0, 0, NULL, 0);",
        )
        .unwrap();
        drop(old);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.pending().unwrap(), vec!["/nix/store/old".to_string()]);
        j.add(&["/nix/store/a".into()]).unwrap();
        j.note_retry("/nix/store/a", "503 SlowDown").unwrap();
        j.note_retry("/nix/store/a", "connection reset").unwrap();
        j.set("/nix/store/a", State::Done, None).unwrap();
        // A settled path takes no more retries.
        j.note_retry("/nix/store/a", "late").unwrap();
        let e = j.entry("/nix/store/a").unwrap().unwrap();
        assert_eq!(
            (e.state, e.error, e.retries, e.last_error),
            (State::Done, None, 2, Some("connection reset".into()))
        );
        j.add(&["/nix/store/a".into()]).unwrap();
        let e = j.entry("/nix/store/a").unwrap().unwrap();
        assert_eq!(
            (e.state, e.retries, e.last_error),
            (State::Pending, 0, None)
        );
        assert_eq!(j.entry("/nix/store/none").unwrap(), None);
    }
}
