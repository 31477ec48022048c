//! `nixcached upload` and `send` as real processes, for the tests of the upload pipeline.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixcached_actors::formats::NarInfo;

use super::NixEnv;

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

/// Makes a FIFO at `p`.
pub fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

/// A running `nixcached upload -k` reading a FIFO; killed when dropped.
pub struct Upload {
    /// The process.
    pub child: Child,
    /// Where its stderr (the log, at `info`) goes.
    pub log: PathBuf,
}

/// Numbers the uploaders of one test process, so each keeps its own log file.
static UPLOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Upload {
    /// Starts an uploader of `fifo` into `dest`, logging at `info`; waits until it owns the FIFO.
    pub fn start(env: &NixEnv, fifo: &Path, dest: &str, extra: &[&str]) -> Upload {
        Upload::start_logging(env, fifo, dest, extra, "info")
    }

    /// Like [`Upload::start`], logging at `rust_log` (a `RUST_LOG` value).
    pub fn start_logging(
        env: &NixEnv,
        fifo: &Path,
        dest: &str,
        extra: &[&str],
        rust_log: &str,
    ) -> Upload {
        let default_state = env.path("state");
        // A test that puts the journal elsewhere says so in `extra`.
        let state_args: Vec<&str> = if extra.contains(&"--state-dir") {
            Vec::new()
        } else {
            vec!["--state-dir", default_state.to_str().unwrap()]
        };
        let n = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = env.path(&format!("upload-{n}.log"));
        let child = env
            .cmd(BIN)
            .args(["upload", "-k", "--input", fifo.to_str().unwrap()])
            .args(&state_args)
            .args([
                "--from",
                &format!("local?root={}", env.store_arg()),
                "--progress-interval",
                "0",
            ])
            .args(extra)
            .arg(dest)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The uploader names its journal in the spool folder once the journal is open and
        // the pipeline is about to read the FIFO.
        let pointer = PathBuf::from(format!("{}.spool/.journal", fifo.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut up = Upload { child, log };
        while !pointer.is_file() {
            assert!(
                up.child.try_wait().unwrap().is_none(),
                "upload exited at start:\n{}",
                up.log_text()
            );
            assert!(Instant::now() < deadline, "upload did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        up
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `kill -SIG`.
    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// SIGHUP: asserts that the uploader finishes what it accepted and exits 0.
    pub fn drain(self) {
        self.signal("HUP");
        let log = self.log.clone();
        let status = self.wait();
        assert!(
            status.success(),
            "SIGHUP: {status}\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// Waits (at most three minutes) for the process to exit.
    pub fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::mem::forget(self);
                return s;
            }
            assert!(Instant::now() < deadline, "upload did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `nixcached send -o FIFO EXTRA… PATHS…`.
pub fn send(fifo: &Path, paths: &[&str], extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["send", "-o", fifo.to_str().unwrap()])
        .args(extra)
        .args(paths)
        .output()
        .unwrap()
}

/// The 32-character digest of a store path.
pub fn digest(p: &str) -> &str {
    &p["/nix/store/".len()..][..32]
}

/// The spool files `send` left next to `fifo` and the uploader has not taken yet (the
/// uploader's own dot-files, such as `.journal`, are not among them).
pub fn spooled(fifo: &Path) -> Vec<std::ffi::OsString> {
    let spool = PathBuf::from(format!("{}.spool", fifo.display()));
    fs::read_dir(&spool)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name())
                .filter(|n| !n.as_encoded_bytes().starts_with(b"."))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that `send`'s spool next to `fifo` holds nothing: every path in it was taken.
pub fn assert_spool_empty(fifo: &Path) {
    let left = spooled(fifo);
    assert!(
        left.is_empty(),
        "{}.spool still holds {left:?}",
        fifo.display()
    );
}

/// Store paths with no references, made quickly.
pub fn many_paths(env: &NixEnv, n: usize) -> Vec<String> {
    many_paths_named(env, n, "src")
}

/// Like [`many_paths`], with sources under `ENV/<prefix><i>` (so one test can make two sets).
pub fn many_paths_named(env: &NixEnv, n: usize, prefix: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let d = env.path(&format!("{prefix}{i}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("data"), format!("object {i}\n").repeat(1000 + i)).unwrap();
            env.add(&d)
        })
        .collect()
}

/// Waits until every path has a narinfo in the folder cache `dest`.
pub fn wait_for_narinfos(dest: &Path, paths: &[String], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing: Vec<&String> = paths
            .iter()
            .filter(|p| !dest.join(format!("{}.narinfo", digest(p))).is_file())
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} paths never uploaded, e.g. {}",
            missing.len(),
            paths.len(),
            missing[0]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A small tmpfs, mounted for one test and unmounted when dropped (the tests run as root).
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    /// Mounts a tmpfs of `size` (`mount -o size=` syntax, such as `1m`) at `at`.
    pub fn mount(at: PathBuf, size: &str) -> SmallFs {
        fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .unwrap();
        super::assert_succeeded(&out);
        SmallFs(at)
    }

    /// Fills it up; returns the filler file, whose removal frees the space.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        filler
    }

    /// Makes it `size` big, keeping what it holds.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        super::assert_succeeded(&out);
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The invariant a reader of any cache must see at every instant: every narinfo among
/// `objects` (key → size, one listing of the cache) points at a NAR of its `FileSize`, and
/// its listing and its references' narinfos are there. `get` reads an object. Returns the
/// narinfos checked, by key.
pub fn check_cache(
    objects: &BTreeMap<String, u64>,
    get: impl Fn(&str) -> Vec<u8>,
) -> Vec<(String, NarInfo)> {
    let mut checked = Vec::new();
    for key in objects.keys().filter(|k| k.ends_with(".narinfo")) {
        let text = String::from_utf8(get(key)).unwrap();
        let info = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{key}: {e}\n{text}"));
        assert_eq!(
            objects.get(&info.url).copied(),
            info.file_size,
            "{key} points at {} ({:?} there)",
            info.url,
            objects.get(&info.url)
        );
        let ls = key.replace(".narinfo", ".ls");
        assert!(objects.contains_key(&ls), "{key} appeared before {ls}");
        for r in &info.references {
            let want = format!("{}.narinfo", r.digest());
            assert!(
                objects.contains_key(&want),
                "{key} appeared before its reference {r}"
            );
        }
        checked.push((key.clone(), info));
    }
    checked
}

/// The objects of a folder cache (key → size). The top level is listed before `nar/`, so a
/// narinfo listed has its NAR (written before it) in the listing too.
pub fn folder_objects(dir: &Path) -> BTreeMap<String, u64> {
    let mut objects = BTreeMap::new();
    for sub in ["", "nar"] {
        let Ok(rd) = fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                let key = if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                };
                objects.insert(key, meta.len());
            }
        }
    }
    objects
}

/// [`check_cache`] on a folder cache; returns how many narinfos it holds.
pub fn check_consistent(dir: &Path) -> usize {
    check_consistent_hashing(dir, &mut BTreeSet::new())
}

/// [`check_consistent`], also hashing each NAR once (the narinfos in `hashed` are done) and
/// comparing with the narinfo's `FileHash`.
pub fn check_consistent_hashing(dir: &Path, hashed: &mut BTreeSet<String>) -> usize {
    let checked = check_cache(&folder_objects(dir), |k| fs::read(dir.join(k)).unwrap());
    for (key, info) in &checked {
        if hashed.insert(key.clone()) {
            let want = info.file_hash.as_ref().expect("FileHash").to_nix32();
            let got = super::nix32_sha256(&fs::read(dir.join(&info.url)).unwrap());
            assert_eq!(got, want, "{key}: {} has other bytes", info.url);
        }
    }
    checked.len()
}
