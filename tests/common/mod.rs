//! Shared harness for the integration tests: a private Nix environment per test (own chroot
//! store, own `XDG_CACHE_HOME`), trees to archive, and a small closure built by the real Nix
//! (the host's 2.8, or the trixie root's 2.26: see [`modern`]).
#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod browser;
pub mod ca;
pub mod conformance;
pub mod credentials;
pub mod fault_proxy;
pub mod modern;
pub mod peers;
pub mod upload;
pub mod upstream_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use modern::Client;

/// A private Nix environment: a scratch folder with its own chroot store and caches, and the
/// real Nix client its Nix commands run.
pub struct NixEnv {
    pub dir: tempfile::TempDir,
    /// The Nix that [`NixEnv::run`] and [`NixEnv::output`] run, and every helper through them.
    pub client: Client,
    /// `NIX_CONFIG` for the commands of this environment only (never the process's own
    /// environment, which every test of the binary shares).
    nix_config: std::cell::RefCell<Option<String>>,
}

/// A closure built by [`NixEnv::build_closure`]: `app` → `lib` → `dep`, plus the busybox
/// that built them (which nothing references).
pub struct Closure {
    pub app: String,
    pub lib: String,
    pub dep: String,
    /// Every path of the closure of `app`, in `nix-store -qR` order (dependencies first).
    pub paths: Vec<String>,
}

impl NixEnv {
    /// Makes a fresh environment; fails loudly when the real Nix is missing, because every
    /// test here is about agreeing with it.
    pub fn new() -> NixEnv {
        NixEnv::with_client(Client::Nix28)
    }

    /// Makes a fresh environment whose Nix commands run `client`; fails (never skips) when
    /// that client is not there, saying to run scripts/test.
    pub fn with_client(client: Client) -> NixEnv {
        let found = Command::new("nix-store").arg("--version").output();
        assert!(
            found.map(|o| o.status.success()).unwrap_or(false),
            "the real Nix (nix-store) is not installed: run scripts/test, which installs the test peers"
        );
        let dir = tempfile::Builder::new()
            .prefix("nixcached-test-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("xdg")).unwrap();
        if client == Client::Nix226 {
            modern::nix226_root();
            // The mount point of the binary's bind mount (see `modern`).
            std::fs::write(dir.path().join(modern::BIN_IN_ROOT), "").unwrap();
            std::fs::create_dir(dir.path().join(modern::NIX_IN_ROOT)).unwrap();
        }
        let env = NixEnv {
            dir,
            client,
            nix_config: std::cell::RefCell::new(None),
        };
        if client == Client::Nix226 {
            let v = env.run("nix", &["--version"]);
            assert!(
                v.contains(" 2.26"),
                "the trixie root's Nix is not 2.26: {v}"
            );
        }
        env
    }

    /// The `nixcached` binary as this environment's Nix sees it (for post-build hooks): the
    /// host's for 2.8, the same file bind-mounted into the test folder for 2.26.
    pub fn nixcached(&self) -> String {
        match self.client {
            Client::Nix28 => env!("CARGO_BIN_EXE_nixcached").to_owned(),
            Client::Nix226 => self.path(modern::BIN_IN_ROOT).display().to_string(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The chroot store of this environment (created by Nix on first use).
    pub fn store_root(&self) -> PathBuf {
        self.path("store")
    }

    /// `--store` argument for the chroot store.
    pub fn store_arg(&self) -> String {
        self.store_root().display().to_string()
    }

    /// A command with this environment's cache folder, so Nix's narinfo cache never leaks
    /// between tests.
    pub fn cmd(&self, program: &str) -> Command {
        self.with_env(Command::new(program))
    }

    /// A command that runs the Nix program `program` (`nix`, `nix-store`, …) of this
    /// environment's client, with this environment's caches and `NIX_CONFIG`.
    pub fn nix_cmd(&self, program: &str) -> Command {
        self.with_env(modern::nix_command(self.client, self.dir.path(), program))
    }

    fn with_env(&self, mut c: Command) -> Command {
        c.env("XDG_CACHE_HOME", self.path("xdg"));
        c.env("HOME", self.dir.path());
        if let Some(conf) = &*self.nix_config.borrow() {
            c.env("NIX_CONFIG", conf);
        }
        c
    }

    /// Sets (or clears) the `NIX_CONFIG` that this environment's commands run with, e.g. a
    /// `post-build-hook` for the builds of one test.
    pub fn set_nix_config(&self, conf: Option<String>) {
        *self.nix_config.borrow_mut() = conf;
    }

    /// Runs a Nix program of this environment's client, panicking with its stderr when it
    /// fails; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a Nix program of this environment's client and returns its whole output, success
    /// or not.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.nix_cmd(program).args(args).output().unwrap()
    }

    /// Adds a file-system tree to the chroot store; returns its store path.
    pub fn add(&self, path: &Path) -> String {
        self.run(
            "nix-store",
            &[
                "--store",
                &self.store_arg(),
                "--add",
                path.to_str().unwrap(),
            ],
        )
        .trim()
        .to_string()
    }

    /// `nix-store --dump` of a file-system path.
    pub fn dump(&self, path: &Path) -> Vec<u8> {
        let out = self.output("nix-store", &["--dump", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "nix-store --dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Generates a signing key pair with Nix; returns (secret key file, public key text).
    pub fn keypair(&self, name: &str) -> (PathBuf, String) {
        let sk = self.path(&format!("{name}.sk"));
        let pk = self.path(&format!("{name}.pk"));
        self.run(
            "nix-store",
            &[
                "--generate-binary-cache-key",
                name,
                sk.to_str().unwrap(),
                pk.to_str().unwrap(),
            ],
        );
        (sk, std::fs::read_to_string(pk).unwrap().trim().to_string())
    }

    /// Builds a three-path closure with references in the chroot store, using the static
    /// busybox that Debian's busybox-static ships as the builder.
    pub fn build_closure(&self) -> Closure {
        let bb = self.path("bbdir/bin");
        std::fs::create_dir_all(&bb).unwrap();
        std::fs::copy("/bin/busybox", bb.join("busybox"))
            .expect("/bin/busybox missing: run scripts/test, which installs busybox-static");
        let bb = self.add(&self.path("bbdir"));
        let dep_dir = self.path("dep");
        std::fs::create_dir_all(dep_dir.join("sub/empty")).unwrap();
        std::fs::write(dep_dir.join("a"), "a\n").unwrap();
        std::fs::write(dep_dir.join("sub/b"), vec![b'b'; 70_000]).unwrap();
        let dep = self.add(&dep_dir);
        let nix = format!(
            r#"let bb = builtins.storePath "{bb}"; dep = builtins.storePath "{dep}";
  mk = name: cmd: builtins.derivation {{ inherit name; system = builtins.currentSystem;
    builder = "${{bb}}/bin/busybox"; args = [ "sh" "-c" cmd ]; PATH = "${{bb}}/bin"; }};
in rec {{
  lib = mk "testlib" "mkdir -p $out/lib && echo ${{dep}} > $out/lib/x && echo building testlib";
  app = mk "testapp" "mkdir -p $out/bin && echo ${{lib}} > $out/bin/uses-lib && ln -s ${{lib}}/lib/x $out/link && printf '#!/bin/sh\necho hi\n' > $out/bin/hi && chmod +x $out/bin/hi && head -c 300000 /dev/urandom > $out/random";
}}"#
        );
        let file = self.path("closure.nix");
        std::fs::write(&file, nix).unwrap();
        let build = |attr: &str| {
            self.run(
                "nix-build",
                &[
                    "--store",
                    &self.store_arg(),
                    file.to_str().unwrap(),
                    "-A",
                    attr,
                    "--no-out-link",
                ],
            )
            .trim()
            .to_string()
        };
        let lib = build("lib");
        let app = build("app");
        let paths = self
            .run("nix-store", &["--store", &self.store_arg(), "-qR", &app])
            .lines()
            .map(str::to_owned)
            .collect();
        Closure {
            app,
            lib,
            dep,
            paths,
        }
    }

    /// `nix store verify -r PATH` on `store`, trusting `pk` (or nothing: `--no-trust`).
    pub fn verify(&self, store: &str, pk: Option<&str>, path: &str) {
        let mut args = vec!["store", "verify", "--store", store];
        match pk {
            Some(pk) => args.extend(["--trusted-public-keys", pk]),
            None => args.push("--no-trust"),
        }
        args.extend(["-r", path]);
        self.run("nix", &args);
    }

    /// `nix copy --from FROM --to TO PATH`, checking signatures against `pk` (or not at all).
    pub fn copy_from(&self, from: &str, to: &str, pk: Option<&str>, path: &str) {
        let mut args = vec!["copy", "--from", from, "--to", to];
        match pk {
            Some(pk) => args.extend(["--trusted-public-keys", pk]),
            None => args.push("--no-check-sigs"),
        }
        args.push(path);
        self.run("nix", &args);
    }

    /// Substitutes `path` into `store` with `substituter` as the only substituter.
    pub fn realise_from(&self, store: &str, substituter: &str, pk: &str, path: &str) {
        self.run(
            "nix-store",
            &[
                "--store",
                store,
                "--realise",
                path,
                "--option",
                "substituters",
                substituter,
                "--option",
                "trusted-public-keys",
                pk,
            ],
        );
    }

    /// Copies `path` from a cache URL into one fresh store and substitutes it into another,
    /// signatures checked against `pk`; `tag` names the stores.
    pub fn substitute_from(&self, url: &str, path: &str, pk: &str, tag: &str) {
        let copy = self.path(&format!("copy-{tag}"));
        self.copy_from(url, copy.to_str().unwrap(), Some(pk), path);
        let sub = self.path(&format!("sub-{tag}"));
        self.realise_from(sub.to_str().unwrap(), url, pk, path);
        self.verify(sub.to_str().unwrap(), Some(pk), path);
    }

    /// The base name of the derivation that built `path` in the chroot store.
    pub fn deriver_of(&self, path: &str) -> String {
        self.run(
            "nix-store",
            &["--store", &self.store_arg(), "-q", "--deriver", path],
        )
        .trim()
        .trim_start_matches("/nix/store/")
        .to_owned()
    }

    /// The real file-system location of a store path of the chroot store.
    pub fn real(&self, store_path: &str) -> PathBuf {
        self.store_root().join(store_path.trim_start_matches('/'))
    }

    /// Signs the closure of `path` in the chroot store with the key in `sk` (`nix store sign`).
    pub fn sign_closure(&self, sk: &Path, path: &str) {
        self.run(
            "nix",
            &[
                "store",
                "sign",
                "--store",
                &self.store_arg(),
                "--key-file",
                sk.to_str().unwrap(),
                "-r",
                path,
            ],
        );
    }

    /// `nix copy` from the chroot store to a URL: `file://…`, or `http://…` for a server that
    /// takes PUTs (add `?secret-key=…&compression=…` to the URL as Nix reads them).
    pub fn copy_to(&self, url: &str, paths: &[&str]) {
        let store = self.store_arg();
        let mut args = vec!["copy", "--from", store.as_str(), "--to", url];
        args.extend_from_slice(paths);
        self.run("nix", &args);
    }
}

/// Runs a future to completion on a fresh runtime (tests stay plain `#[test]` functions).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Fails the test with the command's stderr unless it succeeded.
pub fn assert_succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SHA-256 of bytes in `sha256:<nixbase32>` form.
pub fn nix32_sha256(data: &[u8]) -> String {
    nixcached_actors::formats::Hash::sha256_of(data).to_nix32()
}

/// A running `nixcached` process, stopped (SIGTERM) when dropped.
pub struct Daemon {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `nixcached ARGS… --listen 127.0.0.1:0` and waits until it listens; `url` is
    /// `https://…` when it serves TLS.
    pub fn start(env: &NixEnv, args: &[&str]) -> Daemon {
        let mut cmd = env.cmd(env!("CARGO_BIN_EXE_nixcached"));
        cmd.args(args).args(["--listen", "127.0.0.1:0"]);
        Daemon::spawn(cmd)
    }

    /// Starts `nixcached --config FILE` and waits until it listens; `url` is the first
    /// listener it logs.
    pub fn start_config(env: &NixEnv, config: &Path) -> Daemon {
        let mut cmd = env.cmd(env!("CARGO_BIN_EXE_nixcached"));
        cmd.arg("--config").arg(config);
        Daemon::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Daemon {
        use std::io::BufRead;
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start nixcached");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // `http://`, or `https://` when serving TLS.
                if let Some(i) = line.find("Listening on http") {
                    let rest = &line[i + "Listening on ".len()..];
                    let url = rest.split('/').take(3).collect::<Vec<_>>().join("/");
                    let _ = tx.send(url);
                }
                eprintln!("[nixcached] {line}");
                l2.lock().unwrap().push(line);
            }
        });
        let url = match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "nixcached did not start listening: {:?}",
                    log.lock().unwrap()
                );
            }
        };
        Daemon { child, url, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Whether a log line containing `needle` arrives within 10 s. The log is read by another
    /// thread and trails the responses, so checking it right after a request races.
    pub fn logged(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.log().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    /// The value of a counter from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = curl(&[&format!("{}/metrics", self.url)]);
        let body = String::from_utf8(body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{body}"))
            .parse()
            .unwrap()
    }

    /// Sends a signal and waits for the exit status.
    pub fn signal_and_wait(mut self, sig: &str) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Runs curl (a real HTTP client) and returns (status code, body). Headers are written to
/// stderr by `-D /dev/stderr` when asked for in `args`.
pub fn curl(args: &[&str]) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed by scripts/test");
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').expect("status line");
    let code = String::from_utf8_lossy(&body[nl + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(nl);
    (code, body)
}

/// Response headers of a request (lower-cased names), via `curl -I`-like `-D -`.
pub fn curl_headers(args: &[&str]) -> (u16, Vec<(String, String)>) {
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (code, headers)
}
