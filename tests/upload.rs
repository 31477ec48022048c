//! `nixcached upload` and `send` as real processes, fed by a real Nix post-build hook.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::upload::{
    assert_spool_empty, check_consistent, check_consistent_hashing, digest, many_paths,
    many_paths_named, mkfifo, send, spooled, wait_for_narinfos, Upload,
};
use common::NixEnv;

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

#[test]
fn post_build_hook_uploads_a_closure_that_nix_then_substitutes() {
    let env = NixEnv::new();
    let fifo = env.path("upload.fifo");
    mkfifo(&fifo);
    let (sk, pk) = env.keypair("upload-1");
    // The chroot store must exist before the uploader opens its database.
    many_paths(&env, 1);
    let dest = env.path("cache");
    let up = Upload::start(
        &env,
        &fifo,
        &format!("file://{}", dest.display()),
        &["--allow-finish", "--secret-key-file", sk.to_str().unwrap()],
    );
    let hook = env.path("hook.sh");
    // Debian's Nix 2.8 leaves OUT_PATHS empty (a Nix bug); the hook then asks for the
    // derivation's outputs, as the README's hook does.
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -eu\nOUT=\"${{OUT_PATHS:-$(nix-store --store {} -q --outputs \"$DRV_PATH\")}}\"\nexec {BIN} send -o {} $OUT\n",
            env.store_arg(),
            fifo.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.set_nix_config(Some(format!("post-build-hook = {}", hook.display())));
    let closure = env.build_closure();
    env.set_nix_config(None);
    let out = send(&fifo, &[], &["--finish"]);
    common::assert_succeeded(&out);
    assert!(up.wait().success());

    let url = format!("file://{}", dest.display());
    env.verify(&url, Some(&*pk), &closure.app);
    let fresh = env.path("fresh");
    env.copy_from(&url, fresh.to_str().unwrap(), Some(&*pk), &closure.app);
    env.verify(fresh.to_str().unwrap(), Some(&*pk), &closure.app);
    assert_eq!(check_consistent(&dest), closure.paths.len());
}

#[test]
fn sighup_with_paths_queued_uploads_them_all_and_exits_zero() {
    let env = NixEnv::new();
    let paths = many_paths(&env, 25);
    let fifo = env.path("f");
    mkfifo(&fifo);
    let dest = env.path("cache");
    let up = Upload::start(
        &env,
        &fifo,
        &format!("file://{}?compression=xz", dest.display()),
        &["--jobs", "1", "--compression", "xz"],
    );
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let out = send(&fifo, &refs, &[]);
    common::assert_succeeded(&out);
    up.drain();
    for p in &paths {
        assert!(
            dest.join(format!("{}.narinfo", digest(p))).is_file(),
            "{p} missing after SIGHUP drain"
        );
    }
}

/// A batch larger than `--queue-size` is taken in pieces that fit, never waited on whole
/// (that wait could never end: it hung the pipeline for good before the fix).
#[test]
fn one_send_larger_than_the_queue_is_uploaded_whole() {
    let env = NixEnv::new();
    for (n, k) in [(7, 3), (12, 1)] {
        let paths = many_paths(&env, n);
        let fifo = env.path(&format!("f{n}"));
        mkfifo(&fifo);
        let dest = env.path(&format!("cache{n}"));
        let dest_url = format!("file://{}", dest.display());
        let up = Upload::start(
            &env,
            &fifo,
            &dest_url,
            &["--queue-size", &k.to_string(), "--jobs", "2"],
        );
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let out = send(&fifo, &refs, &["--timeout", "60s"]);
        common::assert_succeeded(&out);
        wait_for_narinfos(&dest, &paths, &format!("{n} paths, queue {k}"));
        up.signal("HUP");
        assert!(up.wait().success(), "SIGHUP after the work is done exits 0");
        assert_eq!(check_consistent(&dest), n);
        assert_spool_empty(&fifo);
        for p in &paths {
            env.verify(&dest_url, None, p);
        }
        fs::remove_dir_all(env.path("state")).unwrap();
    }
}

/// More paths pending in the journal than the queue holds (a long destination outage, then
/// `kill -9`): the next start takes them all, piece by piece.
#[test]
fn a_restart_resumes_more_pending_paths_than_the_queue_holds() {
    let env = NixEnv::new();
    let paths = many_paths(&env, 6);
    let fifo = env.path("f");
    mkfifo(&fifo);
    let dest = env.path("cache");
    let dest_url = format!("file://{}", dest.display());
    let args = ["--queue-size", "2", "--jobs", "1"];
    let up = Upload::start(&env, &fifo, &dest_url, &args);
    // The destination goes away: nothing can finish, the queue stays full.
    let away = env.path("cache-away");
    fs::rename(&dest, &away).unwrap();
    fs::write(&dest, "not a folder").unwrap();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    // The queue is full. Either the reader took the lines (and journals all of them before
    // it waits for room) or `send` is held back and spools them when it gives up: both are
    // durable, and the restart below must find all six either way.
    let out = send(&fifo, &refs, &["--timeout", "5s"]);
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("spooled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines read but not yet committed are item 2 of the upload issue (no acknowledgement on
    // the FIFO yet); give the journal its few milliseconds before the kill.
    std::thread::sleep(Duration::from_secs(2));
    up.signal("KILL");
    let _ = up.wait();
    fs::remove_file(&dest).unwrap();
    fs::rename(&away, &dest).unwrap();
    for p in &paths {
        assert!(
            !dest.join(format!("{}.narinfo", digest(p))).exists(),
            "{p} was uploaded during the outage"
        );
    }
    let up = Upload::start(&env, &fifo, &dest_url, &args);
    wait_for_narinfos(&dest, &paths, "resumed after kill -9");
    up.drain();
    assert_eq!(check_consistent(&dest), paths.len());
    for p in &paths {
        env.verify(&dest_url, None, p);
    }
}

/// The number in each "resuming N paths" line of an uploader's log.
fn resumed_counts(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|l| l.split("resuming ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

/// Paths an uploader's log says it started uploading ("uploading <hash>-<name>") that have
/// no narinfo in `dest` yet.
fn unfinished_uploads(log: &str, dest: &Path) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split("uploading ").nth(1).map(str::trim))
        .map(|base| format!("/nix/store/{base}"))
        .filter(|p| !dest.join(format!("{}.narinfo", digest(p))).is_file())
        .collect()
}

#[test]
fn sigkill_at_any_moment_loses_no_sent_path_and_the_cache_stays_consistent() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let mut all: Vec<String> = many_paths(&env, 30);
    all.push(closure.app.clone());
    let (sk, pk) = env.keypair("sigkill-1");
    let args = ["--jobs", "2", "--secret-key-file", sk.to_str().unwrap()];
    let fifo = env.path("f");
    mkfifo(&fifo);
    let dest = env.path("cache");
    let dest_url = format!("file://{}", dest.display());

    // A watcher polls the destination the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (dest, stop) = (dest.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut checks = 0;
            let mut hashed = BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                check_consistent_hashing(&dest, &mut hashed);
                checks += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            checks
        })
    };

    let mut sent = BTreeSet::new();
    let mut chunks = all.chunks(3);
    let mut resumed = Vec::new();
    // Paths an uploader had started on ("uploading …" logged) and not finished when killed.
    let mut cut_short = BTreeSet::new();
    for round in 0..5u64 {
        let up = Upload::start(&env, &fifo, &dest_url, &args);
        for _ in 0..2 {
            if let Some(chunk) = chunks.next() {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let out = send(&fifo, &refs, &["--timeout", "10s"]);
                common::assert_succeeded(&out);
                sent.extend(chunk.iter().cloned());
            }
        }
        // Kill at a different moment each round: in even rounds as soon as an upload has
        // started and not finished (so some kill surely lands mid-upload), else blindly.
        if round % 2 == 0 {
            let deadline = Instant::now() + Duration::from_millis(500);
            while unfinished_uploads(&up.log_text(), &dest).is_empty() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            std::thread::sleep(Duration::from_millis(round * 37 % 120));
        }
        up.signal("KILL");
        let log = up.log_text();
        up.wait();
        resumed.extend(resumed_counts(&log));
        cut_short.extend(unfinished_uploads(&log, &dest));
    }
    // Whatever is left, sent while no uploader runs: it must wait in the spool.
    let rest: Vec<&str> = chunks.flatten().map(String::as_str).collect();
    if !rest.is_empty() {
        let out = send(&fifo, &rest, &["--timeout", "1s"]);
        assert!(
            !out.status.success(),
            "nobody reads the FIFO, send must time out"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("spooled"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        sent.extend(rest.iter().map(|s| s.to_string()));
    }
    let up = Upload::start(&env, &fifo, &dest_url, &args);
    // Let it pick up the journal and the spool, then drain.
    std::thread::sleep(Duration::from_millis(1500));
    up.signal("HUP");
    let log = up.log.clone();
    assert!(up.wait().success());
    resumed.extend(resumed_counts(&fs::read_to_string(log).unwrap()));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let checks = watcher.join().unwrap();
    assert!(checks > 10, "the watcher ran {checks} times");
    eprintln!(
        "restarts resumed {resumed:?} paths; {} uploads were cut short by a kill: {cut_short:?}",
        cut_short.len()
    );
    // Kills that only ever hit an idle uploader would prove nothing.
    assert!(
        resumed.iter().any(|&n| n > 0),
        "no restart found unfinished work: {resumed:?}"
    );
    assert!(!cut_short.is_empty(), "no kill landed mid-upload");

    for p in &sent {
        assert!(
            dest.join(format!("{}.narinfo", digest(p))).is_file(),
            "{p} was sent but is missing"
        );
    }
    for p in &closure.paths {
        assert!(
            dest.join(format!("{}.narinfo", digest(p))).is_file(),
            "closure member {p} missing"
        );
    }
    assert_eq!(
        check_consistent(&dest),
        sent.len() + closure.paths.len() - 1
    );
    assert_spool_empty(&fifo);
    // Every path, through the real Nix: contents against NarHash and signatures checked on
    // the way into a fresh store, then verified there.
    let fresh = env.path("fresh");
    let fresh = fresh.to_str().unwrap();
    let mut every: Vec<&str> = sent.iter().map(String::as_str).collect();
    every.extend(closure.paths.iter().map(String::as_str));
    let mut copy = vec!["copy", "--from", &dest_url, "--to", fresh];
    copy.extend(["--trusted-public-keys", &pk]);
    copy.extend(&every);
    env.run("nix", &copy);
    let mut verify = vec!["store", "verify", "--store", fresh];
    verify.extend(["--trusted-public-keys", &pk]);
    verify.extend(&every);
    env.run("nix", &verify);
    let mut verify = vec!["store", "verify", "--store", &dest_url];
    verify.extend(["--trusted-public-keys", &pk]);
    verify.extend(&every);
    env.run("nix", &verify);
}

#[test]
fn a_full_queue_blocks_senders_until_their_timeout() {
    let env = NixEnv::new();
    let paths = many_paths(&env, 1);
    let fifo = env.path("f");
    mkfifo(&fifo);
    let dest = env.path("cache");
    fs::create_dir_all(&dest).unwrap();
    let up = Upload::start(
        &env,
        &fifo,
        &format!("file://{}", dest.display()),
        &["--queue-size", "1", "--jobs", "1"],
    );
    // Take the destination away: the first path cannot finish and holds the only slot.
    let away = env.path("cache-away");
    fs::rename(&dest, &away).unwrap();
    fs::write(&dest, "not a folder").unwrap();
    let out = send(&fifo, &[&paths[0]], &["--timeout", "20s"]);
    common::assert_succeeded(&out);
    // Thousands of lines of real paths: more than the queue, the reader's buffer and the
    // pipe hold (~270 KB), and every one must be uploaded once there is room again. The last
    // paths appear only past what the pipe takes, so only the spool can bring them.
    let held_back = many_paths_named(&env, 12, "held");
    let filler: Vec<String> = (0..4000)
        .map(|i: usize| held_back[i.saturating_sub(3988)].clone())
        .collect();
    let refs: Vec<&str> = filler.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = send(&fifo, &refs, &["--timeout", "2s"]);
    assert!(!out.status.success(), "send must block and time out");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out") && stderr.contains("spooled"),
        "{stderr}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    // The destination comes back: the stuck path is retried and lands.
    fs::remove_file(&dest).unwrap();
    fs::rename(&away, &dest).unwrap();
    wait_for_narinfos(&dest, &paths[..1], "resumed after the outage");
    // What the timed-out send spooled is taken too, once there is room again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !spooled(&fifo).is_empty() {
        assert!(Instant::now() < deadline, "the spool was never emptied");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_spool_empty(&fifo);
    // Everything held back gets through: every path of the timed-out send is in the cache,
    // whole (the real Nix checks each NAR against its narinfo's hash).
    wait_for_narinfos(&dest, &held_back, "held back by the full queue");
    for p in &held_back {
        env.verify(&format!("file://{}", dest.display()), None, p);
    }
    up.signal("TERM");
    assert!(up.wait().success());
}

#[test]
fn send_errors_are_clear() {
    let env = NixEnv::new();
    let missing = env.path("no-such-fifo");
    let out = send(&missing, &["/nix/store/x"], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !missing.exists(),
        "send must not create a regular file in place of the FIFO"
    );
    let fifo = env.path("f");
    mkfifo(&fifo);
    let out = send(&fifo, &[], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("requires at least 1 arg"), "{stderr}");
    let out = Command::new(BIN)
        .args(["upload", "--jobs", "0", "file:///tmp/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--jobs") && stderr.contains("0 is not in 1.."),
        "{stderr}"
    );
}

/// `send --wait` returns once the closure is in the destination, even when the uploader it
/// sent to dies before reading the paths and another one takes over; it exits 2 when an
/// upload failed and 3 when `--timeout` runs out first, each with a message that says so.
#[test]
fn send_wait_returns_once_the_closure_is_uploaded_across_a_restart() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("wait-1");
    let fifo = env.path("f");
    mkfifo(&fifo);
    let dest = env.path("cache");
    let url = format!("file://{}", dest.display());
    let args = ["--jobs", "1", "--secret-key-file", sk.to_str().unwrap()];
    let first = Upload::start(&env, &fifo, &url, &args);
    // Frozen: it holds the FIFO open but reads nothing, then dies without a trace.
    first.signal("STOP");
    let mut waiting = Command::new(BIN)
        .args(["send", "--wait", "-o", fifo.to_str().unwrap(), &closure.app])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "send --wait returned before anything was uploaded"
    );
    first.signal("KILL");
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    assert!(waiting.try_wait().unwrap().is_none(), "send --wait gave up");
    let second = Upload::start(&env, &fifo, &url, &args);
    let out = waiting.wait_with_output().unwrap();
    common::assert_succeeded(&out);
    // Back means uploaded: every path of the closure is there and checks out with Nix.
    env.verify(&url, Some(&*pk), &closure.app);
    let fresh = env.path("fresh");
    env.copy_from(&url, fresh.to_str().unwrap(), Some(&*pk), &closure.app);
    env.verify(fresh.to_str().unwrap(), Some(&*pk), &closure.app);

    // A path the local store does not have fails: exit 2, and the message names it.
    let missing = "/nix/store/00000000000000000000000000000000-missing";
    let out = send(&fifo, &[missing], &["--wait", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of the sent paths failed to upload") && stderr.contains(missing),
        "{stderr}"
    );

    // An uploader that makes no progress: exit 3 at the timeout, the path still queued.
    second.signal("STOP");
    let out = send(&fifo, &[&closure.lib], &["--wait", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out after 2s with 1 sent paths not yet uploaded"),
        "{stderr}"
    );
    second.signal("CONT");
    second.drain();
}

/// On a terminal `upload` shows one live line (counts, bytes, rate, what is uploading) and
/// leaves it showing the totals; off a terminal it writes no such line, only the log.
#[test]
fn a_terminal_shows_a_live_progress_line_and_a_log_file_does_not() {
    let env = NixEnv::new();
    let paths = many_paths(&env, 3);
    let input = env.path("paths");
    fs::write(&input, paths.join("\n") + "\n").unwrap();
    let upload = |dest: &str, state: &str| {
        format!(
            "{BIN} upload --input {} --jobs 1 --state-dir {} --from local?root={} file://{}",
            input.display(),
            env.path(state).display(),
            env.store_arg(),
            env.path(dest).display()
        )
    };
    // `script` runs it on a pseudo-terminal and copies what it shows to standard output.
    let shown = env
        .cmd("script")
        .args(["-qfec", &upload("tty-cache", "tty-state"), "/dev/null"])
        // A terminal that can redraw a line; CI runs without TERM, which means "dumb".
        .env("TERM", "xterm")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    common::assert_succeeded(&shown);
    let screen = String::from_utf8_lossy(&shown.stdout);
    assert!(
        screen.contains("3 uploaded, 0 present, 0 failed · 0 queued · "),
        "no final progress line on the terminal:\n{screen}"
    );
    assert!(screen.contains("uploading "), "{screen}");
    let plain = env
        .cmd("sh")
        .args(["-c", &upload("log-cache", "log-state")])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    common::assert_succeeded(&plain);
    let log = String::from_utf8_lossy(&plain.stderr);
    assert!(log.contains("done: 3 uploaded"), "{log}");
    assert!(
        !log.contains(" present, 0 failed · "),
        "a progress line went to a non-terminal:\n{log}"
    );
}
