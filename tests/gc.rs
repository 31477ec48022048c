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
        run(&env, &["pin", "add", &cache, "app", &closure.app]);
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
    }
}
