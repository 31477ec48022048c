//! Access records: when `serve` last handed out each path, kept in its state directory so
//! that `gc --max-age` keeps what clients still fetch, and the explorer can say "last served".
//!
//! A record is a line `<digest> <unix seconds>` appended to one file per served cache. Serving
//! a narinfo marks its path in memory (at most once a minute per path, since narinfo requests
//! are the hottest path); a flush every minute, and one at shutdown, appends the marked paths
//! in one write. The file is rewritten with one line per path when it holds many more lines
//! than paths. Memory is bounded: at most `max_paths` paths are remembered; past that, paths
//! not yet known are not recorded (and a warning says so once), so `gc --max-age` falls back
//! to their upload time.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::formats::Digest;

/// How often marked paths are written out.
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// A path served again within this long is not marked again.
pub const MARK_EVERY_SECS: u64 = 60;
/// Default bound on the paths remembered.
pub const DEFAULT_MAX_PATHS: usize = 1_000_000;
/// Longest line read back: a digest, a space, a number (longer lines are skipped).
const MAX_LINE: usize = 128;

/// The access records of one served cache.
#[derive(Debug)]
pub struct AccessLog {
    path: PathBuf,
    max_paths: usize,
    state: Mutex<State>,
    full_warned: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Every path's last access, as far as this process knows (read back at start).
    latest: HashMap<Digest, u64>,
    /// Paths marked since the last flush.
    dirty: Vec<Digest>,
    /// Lines in the file, to tell when it is worth rewriting.
    lines_on_disk: usize,
    /// Whether the next flush must write every path (`dirty` reached its bound, or a flush
    /// failed).
    rewrite: bool,
}

/// Now, in unix seconds (0 before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AccessLog {
    /// Opens (creating its folder) the record file at `path`, reading back what it holds.
    pub fn open(path: &Path, max_paths: usize) -> io::Result<AccessLog> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "creating {} for access records: {e}; give --state-dir a writable folder",
                        dir.display()
                    ),
                )
            })?;
        }
        let (latest, lines) = match File::open(path) {
            Ok(f) => read_records(f, max_paths)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (HashMap::new(), 0),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("reading access records {}: {e}", path.display()),
                ))
            }
        };
        Ok(AccessLog {
            path: path.to_owned(),
            max_paths: max_paths.max(1),
            state: Mutex::new(State {
                latest,
                dirty: Vec::new(),
                lines_on_disk: lines,
                rewrite: false,
            }),
            full_warned: AtomicBool::new(false),
        })
    }

    /// The record file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Notes that `digest` was served now. Cheap when it was noted within the last minute.
    pub fn served(&self, digest: &Digest) {
        let now = unix_now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let known = st.latest.len();
        match st.latest.get_mut(digest) {
            Some(t) if now < t.saturating_add(MARK_EVERY_SECS) => return,
            Some(t) => *t = now,
            None if known >= self.max_paths => {
                if !self.full_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "access records {} hold {known} paths, their bound: newly served paths are not recorded (raise --access-records-max)",
                        self.path.display()
                    );
                }
                return;
            }
            None => {
                st.latest.insert(*digest, now);
            }
        }
        // Bounded too: past it (flushes failing), the next flush writes every path instead.
        if st.dirty.len() < self.max_paths {
            st.dirty.push(*digest);
        } else {
            st.rewrite = true;
        }
    }

    /// When `digest` was last served, as far as this process knows.
    pub fn last_served(&self, digest: &Digest) -> Option<SystemTime> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.latest
            .get(digest)
            .map(|s| UNIX_EPOCH + Duration::from_secs(*s))
    }

    /// Writes out what was marked since the last flush (blocking file I/O: call it off the
    /// async threads). Rewrites the file whole when it holds over twice as many lines as
    /// paths.
    pub fn flush(&self) -> io::Result<()> {
        let (text, rewrite, lines) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.dirty.is_empty() && !st.rewrite {
                return Ok(());
            }
            let dirty = std::mem::take(&mut st.dirty);
            let rewrite = std::mem::take(&mut st.rewrite)
                || st.lines_on_disk + dirty.len() > 2 * st.latest.len() + 1024;
            let mut text = String::new();
            let mut lines = 0;
            let mut line = |d: &Digest, t: u64| {
                text.push_str(&format!("{d} {t}\n"));
                lines += 1;
            };
            if rewrite {
                st.latest.iter().for_each(|(d, t)| line(d, *t));
            } else {
                dirty.iter().for_each(|d| line(d, st.latest[d]));
            }
            (text, rewrite, lines)
        };
        let written = if rewrite {
            let tmp = self.path.with_extension("tmp");
            File::create(&tmp)
                .and_then(|mut f| {
                    f.write_all(text.as_bytes())?;
                    f.sync_data()
                })
                .and_then(|()| fs::rename(&tmp, &self.path))
        } else {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
        };
        written.map_err(|e| {
            // What was not written goes out with the next flush.
            self.state.lock().unwrap_or_else(|p| p.into_inner()).rewrite = true;
            io::Error::new(
                e.kind(),
                format!("writing access records {}: {e}", self.path.display()),
            )
        })?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.lines_on_disk = if rewrite {
            lines
        } else {
            st.lines_on_disk + lines
        };
        Ok(())
    }
}

/// Reads records: each path's latest time, and how many lines there were. Lines that are not
/// records (a torn last line after a crash, anything else) are skipped; past `max_paths`
/// paths, new ones are ignored.
fn read_records(f: impl Read, max_paths: usize) -> io::Result<(HashMap<Digest, u64>, usize)> {
    let mut latest = HashMap::new();
    let mut lines = 0;
    let mut reader = BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a line longer than any record is read no further than the bound.
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            // Too long (skip to the line's end) or the torn last line.
            if n > MAX_LINE {
                let mut rest = Vec::new();
                loop {
                    rest.clear();
                    let m = (&mut reader).take(4096).read_until(b'\n', &mut rest)?;
                    if m == 0 || rest.last() == Some(&b'\n') {
                        break;
                    }
                }
            }
            continue;
        }
        lines += 1;
        let Some((d, t)) = std::str::from_utf8(&buf)
            .ok()
            .and_then(|l| l.trim_end().split_once(' '))
        else {
            continue;
        };
        let (Ok(d), Ok(t)) = (Digest::parse(d), t.parse::<u64>()) else {
            continue;
        };
        if latest.len() < max_paths || latest.contains_key(&d) {
            let e = latest.entry(d).or_insert(t);
            *e = (*e).max(t);
        }
    }
    Ok((latest, lines))
}

/// Reads the access records at `path` for `gc`: a record file, or a folder whose `*.log`
/// files are all read (several servers' records); each path's latest time wins.
pub fn read_access_records(path: &Path) -> io::Result<HashMap<Digest, SystemTime>> {
    let with_path = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("reading access records {}: {e}", path.display()),
        )
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = fs::read_dir(path)
            .map_err(with_path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_owned()]
    };
    let mut all: HashMap<Digest, SystemTime> = HashMap::new();
    for file in files {
        let f = File::open(&file).map_err(with_path)?;
        let (latest, _) = read_records(f, usize::MAX).map_err(with_path)?;
        for (d, t) in latest {
            let t = UNIX_EPOCH + Duration::from_secs(t.min(u32::MAX as u64 * 4));
            let e = all.entry(d).or_insert(t);
            *e = (*e).max(t);
        }
    }
    Ok(all)
}

/// The record file name for a served cache described by `name` (its URL): the name with
/// everything but letters, digits, `.`, `-` and `_` replaced, so one state folder holds the
/// records of several caches.
pub fn file_name_for(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(120);
    s + ".log"
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "5r1dlyl2wyar1nn50ry8xi6apps79m0j";
    const B: &str = "6r1dlyl2wyar1nn50ry8xi6apps79m0j";

    #[test]
    fn records_survive_a_restart_and_gc_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access/c.log");
        let a = Digest::parse(A).unwrap();
        let log = AccessLog::open(&path, 10).unwrap();
        assert_eq!(log.last_served(&a), None);
        log.served(&a);
        log.served(&a); // within the minute: not marked twice
        log.flush().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 1);
        let t = log.last_served(&a).unwrap();

        let again = AccessLog::open(&path, 10).unwrap();
        assert_eq!(again.last_served(&a), Some(t));
        let read = read_access_records(path.parent().unwrap()).unwrap();
        assert_eq!(read.get(&a), Some(&t));
    }

    #[test]
    fn bad_lines_are_skipped_and_the_bound_holds() {
        let text = format!(
            "{A} 100\ngarbage\n{} 5\n{B} 7\n{A} 200\n{B} not-a-number\n{A} 1",
            "x".repeat(10_000)
        );
        let (latest, _) = read_records(text.as_bytes(), 10).unwrap();
        assert_eq!(
            latest[&Digest::parse(A).unwrap()],
            200,
            "torn last line skipped"
        );
        assert_eq!(latest[&Digest::parse(B).unwrap()], 7);
        let (bounded, _) = read_records(text.as_bytes(), 1).unwrap();
        assert_eq!(bounded.len(), 1);

        let dir = tempfile::tempdir().unwrap();
        let log = AccessLog::open(&dir.path().join("c.log"), 1).unwrap();
        log.served(&Digest::parse(A).unwrap());
        log.served(&Digest::parse(B).unwrap());
        assert!(log.last_served(&Digest::parse(B).unwrap()).is_none());
    }

    #[test]
    fn a_file_with_many_more_lines_than_paths_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let lines: String = (0..3000).map(|i| format!("{A} {i}\n")).collect();
        fs::write(&path, lines).unwrap();
        let log = AccessLog::open(&path, 10).unwrap();
        log.served(&Digest::parse(B).unwrap());
        log.flush().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains(&format!("{A} 2999\n")));
    }

    #[test]
    fn names_are_one_file_name() {
        assert_eq!(file_name_for("s3://b/x?y=1"), "s3___b_x_y_1.log");
    }
}
