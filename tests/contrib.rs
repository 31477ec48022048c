//! The deployment files in `contrib/`, exercised without systemd as PID 1: socket-activated
//! `serve --systemd` under `systemd-socket-activate`, and the upload FIFO held open the way
//! `nixcached-upload.socket` holds it, fed by `contrib/post-build-hook.sh` run by the real Nix.

mod common;

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::NixEnv;

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");
/// Linux's `O_NONBLOCK`, with which systemd opens a ListenFIFO (no libc crate here for one flag).
const O_NONBLOCK: i32 = 0o4000;
const HOOK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/post-build-hook.sh");

/// Retries `f` until it gives `Some` or `secs` pass.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn socket_activated_serve_answers_the_connection_that_started_it() {
    let found = Command::new("systemd-socket-activate")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "systemd-socket-activate (Debian package systemd) is missing: run scripts/test, which installs it"
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    fs::create_dir(&cache).unwrap();
    fs::write(
        cache.join("nix-cache-info"),
        "StoreDir: /nix/store\nPriority: 42\n",
    )
    .unwrap();
    let store = format!("file://{}", cache.display());
    let sock = dir.path().join("serve.sock");
    let tcp = format!("127.0.0.1:{}", common::peers::free_port());
    // The two kinds of socket a .socket unit can pass: ListenStream=PORT and ListenStream=/path.
    for (listen, curl_args) in [
        (tcp.clone(), vec![format!("http://{tcp}/nix-cache-info")]),
        (
            sock.display().to_string(),
            vec![
                "--unix-socket".to_owned(),
                sock.display().to_string(),
                "http://localhost/nix-cache-info".to_owned(),
            ],
        ),
    ] {
        // systemd-socket-activate binds the socket, waits for a connection, then execs the
        // command in its own process with LISTEN_FDS=1 and LISTEN_PID set, as systemd does.
        let mut child = Command::new("systemd-socket-activate")
            .args(["-l", &listen, BIN, "serve", "--systemd", &store])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let args: Vec<&str> = curl_args.iter().map(String::as_str).collect();
        // The first request that connects is the one that starts the server, which answers it.
        let body = wait_for(20, "the socket-activated server", || {
            let (code, body) = common::curl(&args);
            (code == 200).then_some(body)
        });
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("Priority: 42"), "{listen}: {body}");
        let comm = fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap();
        assert_eq!(comm.trim(), "nixcached", "the activator became the server");
        assert!(Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        assert!(child.wait().unwrap().success(), "{listen}: a clean stop");
    }
}

#[test]
fn post_build_hook_queues_into_a_held_fifo_and_upload_started_later_takes_it() {
    let env = NixEnv::new();
    // What nixcached-upload.socket does: create the FIFO (mode 0600) and hold it open,
    // read-write and non-blocking, so that senders find a reader while no uploader runs.
    let fifo = env.path("nixcached-upload");
    assert!(Command::new("mkfifo")
        .args(["-m", "0600"])
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let _held = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_NONBLOCK)
        .open(&fifo)
        .unwrap();

    // A derivation built by the real Nix, with the contrib hook configured. Debian's Nix 2.8
    // gives the hook an empty OUT_PATHS, so this also proves the hook's fallback.
    let bb = env.path("bb/bin");
    fs::create_dir_all(&bb).unwrap();
    fs::copy("/bin/busybox", bb.join("busybox"))
        .expect("/bin/busybox missing: run scripts/test, which installs busybox-static");
    let bb = env.add(&env.path("bb"));
    let expr = format!(
        r#"let bb = builtins.storePath "{bb}"; in builtins.derivation {{
  name = "hooked"; system = builtins.currentSystem; builder = "${{bb}}/bin/busybox";
  args = [ "sh" "-c" "mkdir $out && ln -s ${{bb}} $out/bb && echo built > $out/x" ]; }}"#
    );
    let store = env.store_arg();
    let out = env
        .cmd("nix-build")
        .args(["--store", &store, "--no-out-link", "-E", &expr])
        // The hook's own `nix-store -q` must ask the same (chroot) store.
        .env(
            "NIX_CONFIG",
            format!("post-build-hook = {HOOK}\nstore = {store}\n"),
        )
        .env("NIXCACHED", BIN)
        .env("NIXCACHED_FIFO", &fifo)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix-build: {log}");
    assert!(!log.contains("could not queue"), "{log}");
    let built = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // Now the uploader starts (systemd would start it on the FIFO becoming readable), opening
    // the FIFO by path as nixcached-upload.service does, and finds the queued path.
    let dest = env.path("cache");
    let mut upload = env
        .cmd(BIN)
        .args(["upload", "-k", "--allow-finish", "--input"])
        .arg(&fifo)
        .args(["--state-dir", env.path("state").to_str().unwrap()])
        .args(["--from", &format!("local?root={store}")])
        .args(["--progress-interval", "0"])
        .arg(format!("file://{}", dest.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let spool = env.path("nixcached-upload.spool");
    wait_for(20, "the uploader to start", || spool.is_dir().then_some(()));
    let finish = Command::new(BIN)
        .args(["send", "--finish", "-o"])
        .arg(&fifo)
        .output()
        .unwrap();
    assert!(
        finish.status.success(),
        "{}",
        String::from_utf8_lossy(&finish.stderr)
    );
    let status = wait_for(60, "the uploader to finish", || upload.try_wait().unwrap());
    assert!(status.success());

    // The built path and its reference (busybox) are in the cache, whole.
    let fresh = env.path("fresh");
    env.copy_from(
        &format!("file://{}", dest.display()),
        fresh.to_str().unwrap(),
        None,
        &built,
    );
    env.verify(fresh.to_str().unwrap(), None, &built);
    assert!(fresh.join(bb.trim_start_matches('/')).is_dir());
}
