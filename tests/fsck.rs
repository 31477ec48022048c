//! `nixcached fsck` on caches the real Nix and `nixcached upload` wrote, clean and then
//! damaged in each way it reports, in a folder, a moto S3 bucket and a fake-gcs-server bucket.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::peers::{fresh_name, new_gcs_bucket, new_s3_bucket};
use common::{curl, NixEnv};

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

fn digest(store_path: &str) -> &str {
    &store_path.rsplit('/').next().unwrap()[..32]
}

fn fsck(env: &NixEnv, args: &[&str]) -> Output {
    env.cmd(BIN).arg("fsck").args(args).output().unwrap()
}

/// The JSON report's count of findings of each kind, and the exit code.
fn counts(env: &NixEnv, args: &[&str]) -> (std::collections::BTreeMap<String, usize>, i32) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = fsck(env, &all);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck --json printed no report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut by_kind = std::collections::BTreeMap::new();
    for f in report["findings"].as_array().unwrap() {
        *by_kind
            .entry(f["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    (by_kind, out.status.code().unwrap())
}

/// The `URL:` of a narinfo file.
fn nar_url(narinfo: &Path) -> String {
    fs::read_to_string(narinfo)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned()
}

#[test]
fn fsck_reports_each_kind_of_damage_in_a_folder() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("fsck-1");
    let dir = env.path("cache");
    let url = format!("file://{}", dir.display());
    env.copy_to(
        &format!("{url}?compression=xz&secret-key={}", sk.display()),
        &[&closure.app],
    );
    // Two more paths: one to cut short, one copied without a signature.
    let short_dir = env.path("short");
    fs::write(&short_dir, vec![b's'; 50_000]).unwrap();
    let short = env.add(&short_dir);
    env.copy_to(
        &format!("{url}?compression=xz&secret-key={}", sk.display()),
        &[&short],
    );
    let unsigned_dir = env.path("unsigned");
    fs::write(&unsigned_dir, "not signed\n").unwrap();
    let unsigned = env.add(&unsigned_dir);
    env.copy_to(&format!("{url}?compression=xz"), &[&unsigned]);

    // Clean, with every check on: exit 0 and a table that says so.
    let out = fsck(
        &env,
        &["--verify-content", "--trusted-public-key", &pk, &url],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("unsigned"), "{text}");
    let (by_kind, code) = counts(
        &env,
        &["--verify-content", "--trusted-public-key", &pk, &url],
    );
    assert_eq!(code, 1);
    assert_eq!(
        by_kind,
        [("unsigned".to_owned(), 1)].into(),
        "only the path copied without a key is unsigned"
    );
    let out = fsck(&env, &["--verify-content", &url]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no problems found"));

    let ni = |p: &str| dir.join(format!("{}.narinfo", digest(p)));
    // app: its NAR is gone.
    fs::remove_file(dir.join(nar_url(&ni(&closure.app)))).unwrap();
    // lib: one byte of its NAR flipped, same size (only --verify-content sees it).
    let lib_nar = dir.join(nar_url(&ni(&closure.lib)));
    let mut bytes = fs::read(&lib_nar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&lib_nar, &bytes).unwrap();
    // short: its NAR cut short.
    let short_nar = dir.join(nar_url(&ni(&short)));
    let bytes = fs::read(&short_nar).unwrap();
    fs::write(&short_nar, &bytes[..bytes.len() - 10]).unwrap();
    // dep: its narinfo is gone, so lib's reference dangles and dep's NAR is an orphan.
    fs::remove_file(ni(&closure.dep)).unwrap();
    // A narinfo that does not parse, and a NAR file nothing points at.
    fs::write(
        dir.join("00000000000000000000000000000000.narinfo"),
        "StorePath: nonsense\n",
    )
    .unwrap();
    fs::write(dir.join("nar/stray.nar.xz"), "stray").unwrap();

    let (by_kind, code) = counts(&env, &[&url]);
    assert_eq!(code, 1);
    let want = |extra: &[(&str, usize)]| {
        let mut m: std::collections::BTreeMap<String, usize> = [
            ("missing-nar", 1),
            ("size-mismatch", 1),
            ("dangling-reference", 1),
            ("unparsable", 1),
            ("orphan-nar", 2),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        for (k, v) in extra {
            m.insert(k.to_string(), *v);
        }
        m
    };
    assert_eq!(by_kind, want(&[]));
    let (by_kind, _) = counts(&env, &["--verify-content", &url]);
    assert_eq!(by_kind, want(&[("content-mismatch", 1)]));

    // The table names each finding's object.
    let out = fsck(&env, &["--verify-content", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        format!("missing-nar          {}.narinfo", digest(&closure.app)),
        format!("content-mismatch     {}.narinfo", digest(&closure.lib)),
        format!("dangling-reference   {}.narinfo", digest(&closure.lib)),
        "orphan-nar           nar/stray.nar.xz".to_owned(),
    ] {
        assert!(text.contains(&needle), "no {needle:?} in\n{text}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("problem(s) found"), "{err}");

    // Repair: every broken path and every referrer goes, referrers first; what is left is
    // consistent (only orphan NARs and the unsigned path are reported) and Nix copies from it.
    let out = fsck(&env, &["--json", "--verify-content", "--repair", &url]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let removed: Vec<&str> = report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let key = |p: &str| format!("{}.narinfo", digest(p));
    let mut sorted = removed.clone();
    sorted.sort();
    let mut want = vec![
        key(&closure.app),
        key(&closure.lib),
        key(&short),
        "00000000000000000000000000000000.narinfo".to_owned(),
    ];
    want.sort();
    assert_eq!(sorted, want);
    let pos = |k: &str| removed.iter().position(|r| *r == k).unwrap();
    assert!(
        pos(&key(&closure.app)) < pos(&key(&closure.lib)),
        "app references lib, so it goes first: {removed:?}"
    );
    let (by_kind, code) = counts(&env, &["--verify-content", &url]);
    assert_eq!(code, 1);
    assert_eq!(by_kind, [("orphan-nar".to_owned(), 4)].into());
    env.copy_from(
        &url,
        &env.path("fresh-store").display().to_string(),
        None,
        &unsigned,
    );
}

#[test]
fn fsck_says_when_it_cannot_check() {
    let env = NixEnv::new();
    for (args, needle) in [
        (
            vec!["/nix/store"],
            "file:///DIR, s3://BUCKET or gs://BUCKET",
        ),
        (
            vec!["--trusted-public-key", "nonsense", "file:///tmp"],
            "NAME:BASE64",
        ),
    ] {
        let out = fsck(&env, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

/// curl's arguments for moto's S3 API, which refuses unsigned requests for objects.
const SIGV4: [&str; 4] = ["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test"];

/// Uploads the closure of `path` with `nixcached upload`.
fn upload(env: &NixEnv, url: &str, path: &str) {
    let input = env.path(&fresh_name("paths"));
    fs::write(&input, format!("{path}\n")).unwrap();
    let out = env
        .cmd(BIN)
        .args(["upload", "--input", input.to_str().unwrap()])
        .args(["--progress-interval", "0"])
        .args([
            "--state-dir",
            env.path(&fresh_name("state")).to_str().unwrap(),
        ])
        .args(["--from", &format!("local?root={}", env.store_arg()), url])
        .output()
        .unwrap();
    common::assert_succeeded(&out);
}

#[test]
fn fsck_checks_s3_and_gcs_buckets() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (s3_ep, s3_bucket) = new_s3_bucket("fsck");
    let (gcs_ep, gcs_bucket) = new_gcs_bucket("fsck");
    let caches = [
        (
            format!("s3://{s3_bucket}?endpoint={s3_ep}&region=us-east-1"),
            format!("{s3_ep}/{s3_bucket}/"),
        ),
        (
            format!("gs://{gcs_bucket}?endpoint={gcs_ep}"),
            format!("{gcs_ep}/storage/v1/b/{gcs_bucket}/o/"),
        ),
    ];
    for (url, delete_prefix) in caches {
        upload(&env, &url, &closure.app);
        let (by_kind, code) = counts(&env, &["--verify-content", &url]);
        assert_eq!((by_kind.len(), code), (0, 0), "{url}: {by_kind:?}");

        // Remove lib's NAR and dep's narinfo behind the cache's back.
        let gcs = url.starts_with("gs://");
        let lib_narinfo = {
            let key = format!("{}.narinfo", digest(&closure.lib));
            let (code, body) = if gcs {
                curl(&[&format!(
                    "{gcs_ep}/storage/v1/b/{gcs_bucket}/o/{key}?alt=media"
                )])
            } else {
                curl(&[
                    SIGV4[0],
                    SIGV4[1],
                    SIGV4[2],
                    SIGV4[3],
                    &format!("{s3_ep}/{s3_bucket}/{key}"),
                ])
            };
            assert_eq!(code, 200);
            String::from_utf8(body).unwrap()
        };
        let lib_nar = lib_narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        for key in [lib_nar, format!("{}.narinfo", digest(&closure.dep))] {
            let target = if gcs {
                format!("{delete_prefix}{}", key.replace('/', "%2F"))
            } else {
                format!("{delete_prefix}{key}")
            };
            let (code, body) = if gcs {
                curl(&["-X", "DELETE", &target])
            } else {
                curl(&[
                    SIGV4[0], SIGV4[1], SIGV4[2], SIGV4[3], "-X", "DELETE", &target,
                ])
            };
            assert!(
                code == 204 || code == 200,
                "DELETE {target}: {code} {}",
                String::from_utf8_lossy(&body)
            );
        }
        let (by_kind, code) = counts(&env, &[&url]);
        assert_eq!(code, 1);
        assert_eq!(
            by_kind,
            [
                ("dangling-reference".to_owned(), 1),
                ("missing-nar".to_owned(), 1),
                ("orphan-nar".to_owned(), 1),
            ]
            .into(),
            "{url}"
        );
    }
}
