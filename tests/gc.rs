//! `nixcached gc` and `nixcached pin` on caches written by the real Nix and by `upload`: what
//! stays is the closure of pins, `--keep` roots, recent and fresh uploads; what goes goes
//! narinfos first (referrers first) and files a grace period later; `fsck` finds nothing broken
//! at every step, and Nix substitutes what was kept.

mod common;

use std::fs;
use std::process::Output;

use common::peers::{fresh_name, new_gcs_bucket, new_s3_bucket};
use common::NixEnv;

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

fn key(store_path: &str) -> String {
    format!("{}.narinfo", &store_path.rsplit('/').next().unwrap()[..32])
}

fn run(env: &NixEnv, args: &[&str]) -> Output {
    let out = env.cmd(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nixcached {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `gc --json ARGS`: the report.
fn gc(env: &NixEnv, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["gc", "--json"];
    all.extend_from_slice(args);
    serde_json::from_slice(&run(env, &all).stdout).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// `fsck` finds nothing that breaks a substitution (orphan NARs may wait for the next gc).
fn nothing_broken(env: &NixEnv, cache: &str) -> usize {
    let out = env
        .cmd(BIN)
        .args(["fsck", "--json", cache])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut orphans = 0;
    for f in report["findings"].as_array().unwrap() {
        assert_eq!(f["kind"], "orphan-nar", "{cache}: {f}");
        orphans += 1;
    }
    orphans
}

/// The closure (app → lib → dep) and an unrelated path, in a folder cache written by Nix.
struct Setup {
    env: NixEnv,
    closure: common::Closure,
    other: String,
    dir: std::path::PathBuf,
    cache: String,
}

fn setup() -> Setup {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let other_dir = env.path("other");
    fs::write(&other_dir, "unrelated\n").unwrap();
    let other = env.add(&other_dir);
    let dir = env.path("cache");
    let cache = format!("file://{}", dir.display());
    env.copy_to(
        &format!("{cache}?compression=xz&write-nar-listing=true"),
        &[&closure.app, &other],
    );
    Setup {
        env,
        closure,
        other,
        dir,
        cache,
    }
}

#[test]
fn gc_keeps_the_closure_of_roots_and_removes_files_a_grace_period_later() {
    let s = setup();
    let keep = s.env.path("keep");
    fs::write(&keep, format!("{}\n", s.closure.app)).unwrap();
    let keep = keep.to_str().unwrap();
    let nar_of_other = fs::read_to_string(s.dir.join(key(&s.other)))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();

    // Dry, nothing changes.
    let r = gc(
        &s.env,
        &["--keep", keep, "--grace", "0s", "--dry-run", &s.cache],
    );
    assert_eq!(strings(&r["removed_narinfos"]), [key(&s.other)]);
    assert!(s.dir.join(key(&s.other)).exists());

    // First run: the other path's narinfo goes; its NAR and .ls wait in a tombstone.
    let r = gc(&s.env, &["--keep", keep, "--grace", "0s", &s.cache]);
    assert_eq!(strings(&r["removed_narinfos"]), [key(&s.other)]);
    assert_eq!(r["removed_files"].as_array().unwrap().len(), 0);
    assert_eq!(r["deferred_files"], 2, "{r}");
    assert!(s.dir.join(&nar_of_other).exists());
    assert_eq!(
        nothing_broken(&s.env, &s.cache),
        1,
        "the other path's NAR waits"
    );

    // Second run, the grace period (0 s) over: the files and the tombstone go.
    let r = gc(&s.env, &["--keep", keep, "--grace", "0s", &s.cache]);
    let mut files = strings(&r["removed_files"]);
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.contains(&nar_of_other), "{files:?}");
    assert!(
        files.iter().any(|f| f.starts_with("gc/removed-")),
        "{files:?}"
    );
    assert!(!s.dir.join(&nar_of_other).exists());
    assert_eq!(nothing_broken(&s.env, &s.cache), 0);

    // What was kept is whole: Nix copies the closure from the cache.
    let fresh = s.env.path("fresh");
    s.env
        .copy_from(&s.cache, fresh.to_str().unwrap(), None, &s.closure.app);
}

#[test]
fn gc_honours_grace_max_age_and_pins_and_removes_referrers_first() {
    let s = setup();
    let c = &s.cache;
    // Everything is younger than an hour: the grace period keeps it all.
    let r = gc(&s.env, &["--max-age", "0s", c]);
    assert_eq!(r["removed_narinfos"].as_array().unwrap().len(), 0, "{r}");
    // As does --max-age 1h.
    let r = gc(&s.env, &["--max-age", "1h", "--grace", "0s", c]);
    assert_eq!(r["removed_narinfos"].as_array().unwrap().len(), 0, "{r}");

    // A pin in the cache keeps lib's closure.
    run(&s.env, &["pin", "add", c, "release-1", &s.closure.lib]);
    let out = run(&s.env, &["pin", "ls", c]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("release-1") && listed.contains(&s.closure.lib),
        "{listed}"
    );
    let r = gc(&s.env, &["--max-age", "0s", "--grace", "0s", c]);
    let mut removed = strings(&r["removed_narinfos"]);
    removed.sort();
    let mut want = vec![key(&s.closure.app), key(&s.other)];
    want.sort();
    assert_eq!(removed, want);
    assert_eq!(nothing_broken(&s.env, c), 2);

    // Unpinned, lib and dep go, lib (the referrer) first.
    run(&s.env, &["pin", "rm", c, "release-1"]);
    let r = gc(&s.env, &["--max-age", "0s", "--grace", "0s", c]);
    assert_eq!(
        strings(&r["removed_narinfos"]),
        [key(&s.closure.lib), key(&s.closure.dep)]
    );
    assert_eq!(r["kept"], 0);
    nothing_broken(&s.env, c);
}

#[test]
fn gc_needs_a_retention_policy_and_says_so() {
    let env = NixEnv::new();
    let out = env
        .cmd(BIN)
        .args(["gc", "file:///tmp/nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--keep FILE") && err.contains("--max-age"),
        "{err}"
    );
    let out = env
        .cmd(BIN)
        .args(["pin", "add", "file:///tmp/nowhere", "../x", "/nix/store/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn gc_on_s3_and_gcs_buckets_written_by_upload() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let other_dir = env.path("other");
    fs::write(&other_dir, "unrelated\n").unwrap();
    let other = env.add(&other_dir);
    let (s3_ep, s3) = new_s3_bucket("gc");
    let (gcs_ep, gcs) = new_gcs_bucket("gc");
    for cache in [
        format!("s3://{s3}?endpoint={s3_ep}&region=us-east-1"),
        format!("gs://{gcs}?endpoint={gcs_ep}"),
    ] {
        let input = env.path(&fresh_name("paths"));
        fs::write(&input, format!("{}\n{other}\n", closure.app)).unwrap();
        run(
            &env,
            &[
                "upload",
                "--input",
                input.to_str().unwrap(),
                "--progress-interval",
                "0",
                "--state-dir",
                env.path(&fresh_name("state")).to_str().unwrap(),
                "--from",
                &format!("local?root={}", env.store_arg()),
                &cache,
            ],
        );
        // Over a size of nothing, all would go, referrers first.
        let r = gc(
            &env,
            &["--max-size", "0", "--grace", "0s", "--dry-run", &cache],
        );
        let would = strings(&r["removed_narinfos"]);
        assert_eq!(would.len(), 4, "{cache}: {r}");
        run(&env, &["pin", "add", &cache, "app", &closure.app]);
        let r = gc(
            &env,
            &["--max-size", "0", "--grace", "0s", "--dry-run", &cache],
        );
        assert_eq!(strings(&r["removed_narinfos"]), [key(&other)], "{cache}");
        let r = gc(&env, &["--max-age", "0s", "--grace", "0s", &cache]);
        assert_eq!(strings(&r["removed_narinfos"]), [key(&other)], "{cache}");
        assert_eq!(nothing_broken(&env, &cache), 1, "{cache}");
        let r = gc(&env, &["--max-age", "0s", "--grace", "0s", &cache]);
        assert_eq!(
            r["removed_files"].as_array().unwrap().len(),
            3,
            "{cache}: {r}"
        );
        assert_eq!(nothing_broken(&env, &cache), 0, "{cache}");
        // The real Nix substitutes what was kept, through the server.
        let daemon = common::Daemon::start(&env, &["serve", "--no-access-records", &cache]);
        let fresh = env.path(&fresh_name("fresh"));
        env.copy_from(&daemon.url, fresh.to_str().unwrap(), None, &closure.app);
    }
}

/// Sets the time `path` (a file in the cache folder) was written to `secs` seconds ago.
fn written_ago(path: &std::path::Path, secs: u64) {
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Every file of the folder cache `dir` written `secs` ago.
fn all_written_ago(dir: &std::path::Path, secs: u64) {
    for entry in walk(dir) {
        written_ago(&entry, secs);
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

const DAY: u64 = 24 * 3600;

#[test]
fn gc_max_size_removes_least_recently_used_first_never_half_a_closure() {
    let s = setup();
    let c = &s.cache;
    all_written_ago(&s.dir, 2 * DAY);
    // app (the top referrer) is the oldest, then other; lib was written most recently, and
    // dep, older than lib, counts as used when lib was, since lib references it.
    written_ago(&s.dir.join(key(&s.closure.app)), 5 * DAY);
    written_ago(&s.dir.join(key(&s.other)), 3 * DAY);
    written_ago(&s.dir.join(key(&s.closure.lib)), DAY);
    written_ago(&s.dir.join(key(&s.closure.dep)), 4 * DAY);

    let r = gc(&s.env, &["--max-size", "1T", "--grace", "0s", c]);
    assert_eq!(r["removed_narinfos"].as_array().unwrap().len(), 0, "{r}");
    let total = r["total_bytes"].as_u64().unwrap();
    let on_disk: u64 = walk(&s.dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(total, on_disk, "total_bytes counts every object");

    assert_eq!(r["kept_bytes"], total, "{r}");

    // One byte too many: the least recently used path goes, app; not dep, the oldest
    // written, since lib still needs it.
    let r = gc(
        &s.env,
        &["--max-size", &(total - 1).to_string(), "--grace", "1h", c],
    );
    assert_eq!(
        strings(&r["removed_narinfos"]),
        [key(&s.closure.app)],
        "{r}"
    );
    // Its NAR waits for the grace period but counts as gone: a second run with the same
    // limit removes nothing more.
    let r = gc(
        &s.env,
        &["--max-size", &(total - 1).to_string(), "--grace", "0s", c],
    );
    assert_eq!(r["removed_narinfos"].as_array().unwrap().len(), 0, "{r}");
    // One byte less than what is left: now other.
    let left = r["kept_bytes"].as_u64().unwrap();
    assert!(left < total, "{r}");
    let r = gc(
        &s.env,
        &["--max-size", &(left - 1).to_string(), "--grace", "0s", c],
    );
    assert_eq!(strings(&r["removed_narinfos"]), [key(&s.other)], "{r}");
    nothing_broken(&s.env, c);
    // Down to nothing but a pin: lib's closure stays whole, it alone.
    run(&s.env, &["pin", "add", c, "lib", &s.closure.lib]);
    let r = gc(&s.env, &["--max-size", "0", "--grace", "0s", c]);
    assert_eq!(r["removed_narinfos"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["kept"], 2, "{r}");
    run(&s.env, &["pin", "rm", c, "lib"]);
    let r = gc(
        &s.env,
        &["--max-size", "0", "--grace", "0s", "--dry-run", c],
    );
    assert_eq!(
        strings(&r["removed_narinfos"]).len(),
        2,
        "without the pin both would go: {r}"
    );
    let fresh = s.env.path("fresh");
    s.env
        .copy_from(c, fresh.to_str().unwrap(), None, &s.closure.lib);
}

#[test]
fn gc_max_age_keeps_what_serve_served_and_the_explorer_says_when() {
    let s = setup();
    let c = &s.cache;
    all_written_ago(&s.dir, 2 * DAY);
    let state = s.env.path("serve-state");
    let state_arg = state.to_str().unwrap();
    let daemon = common::Daemon::start(&s.env, &["serve", "--state-dir", state_arg, c]);
    // Nix fetches other through the server.
    let fresh = s.env.path("fresh");
    s.env
        .copy_from(&daemon.url, fresh.to_str().unwrap(), None, &s.other);
    let digest = &key(&s.other)[..32];
    let page = |url: &str| {
        let (code, body) = common::curl(&[
            "-H",
            "Accept: text/html",
            &format!("{url}/{digest}.narinfo"),
        ]);
        assert_eq!(code, 200);
        String::from_utf8(body).unwrap()
    };
    let html = page(&daemon.url);
    assert!(
        html.contains("id=\"last-served\">20") && html.contains(" ago)"),
        "the object page says when it was served: {html}"
    );
    // Stopped, the server writes out its records.
    assert!(daemon.signal_and_wait("TERM").success());
    let records = state.join("access");
    let text: String = walk(&records)
        .iter()
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    assert!(text.contains(digest), "{text}");

    // Without the records everything is two days old and would go; with them, other stays.
    let r = gc(
        &s.env,
        &["--max-age", "1d", "--grace", "0s", "--dry-run", c],
    );
    assert_eq!(strings(&r["removed_narinfos"]).len(), 4, "{r}");
    let r = gc(
        &s.env,
        &[
            "--max-age",
            "1d",
            "--grace",
            "0s",
            "--access-records",
            records.to_str().unwrap(),
            c,
        ],
    );
    let mut removed = strings(&r["removed_narinfos"]);
    removed.sort();
    let mut want = vec![
        key(&s.closure.app),
        key(&s.closure.lib),
        key(&s.closure.dep),
    ];
    want.sort();
    assert_eq!(removed, want, "{r}");
    assert_eq!(
        nothing_broken(&s.env, c),
        3,
        "their NARs wait for the grace period"
    );

    // A restarted server still knows when other was served.
    let daemon = common::Daemon::start(&s.env, &["serve", "--state-dir", state_arg, c]);
    assert!(page(&daemon.url).contains("id=\"last-served\">20"));
    let again = s.env.path("again");
    s.env
        .copy_from(&daemon.url, again.to_str().unwrap(), None, &s.other);
}

#[test]
fn gc_and_fsck_show_progress_on_a_terminal_only() {
    let s = setup();
    // `script` runs the command on a pseudo-terminal and copies what it draws.
    for (cmd, what) in [
        (format!("{BIN} fsck {}", s.cache), "fsck: "),
        (format!("{BIN} gc --max-age 1h {}", s.cache), "gc: "),
    ] {
        let out = s
            .env
            .cmd("script")
            .args(["-qec", &cmd, "/dev/null"])
            // A terminal that can redraw a line; CI runs without TERM, which means "dumb".
            .env("TERM", "xterm")
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        let drawn = String::from_utf8_lossy(&out.stdout);
        assert!(
            drawn.contains(what),
            "{cmd} drew no progress line: {drawn:?}"
        );
        // Off a terminal, no line: logs and pipes stay clean.
        let args: Vec<&str> = cmd.split(' ').skip(1).collect();
        let out = s.env.cmd(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains(what), "{cmd}: {err}");
    }
}

#[test]
fn gc_leaves_the_nar_of_a_narinfo_it_cannot_read() {
    let s = setup();
    let c = &s.cache;
    all_written_ago(&s.dir, 2 * DAY);
    let ni = s.dir.join(key(&s.other));
    let nar = fs::read_to_string(&ni)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    // Damaged: fsck --repair may still write the path again or remove it; gc cannot tell
    // which NAR file is its, so it takes none for an orphan.
    fs::write(&ni, "StorePath: not a narinfo\n").unwrap();
    written_ago(&ni, 2 * DAY);
    for _ in 0..2 {
        let r = gc(&s.env, &["--max-age", "1h", "--grace", "0s", c]);
        assert_eq!(r["unreadable"], 1, "{r}");
        assert!(
            s.dir.join(&nar).exists(),
            "its NAR was taken for an orphan: {r}"
        );
        assert!(ni.exists());
    }
}
