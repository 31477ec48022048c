//! `nixcached fsck` on caches the real Nix and `nixcached upload` wrote, clean and then
//! damaged in each way it reports, in a folder, a moto S3 bucket and a fake-gcs-server bucket;
//! and repaired, writing broken paths again from a local store where it holds them.

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
        (
            vec!["--repair", "--from-store", "file:///tmp", "file:///tmp"],
            "must name a local Nix store",
        ),
        (vec!["--from-store", "local", "file:///tmp"], "--repair"),
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

/// `fsck --json ARGS`: the report and the exit code.
fn report(env: &NixEnv, args: &[&str]) -> (serde_json::Value, i32) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = fsck(env, &all);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck --json printed no report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code().unwrap())
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Each finding of a report as (kind, key), sorted.
fn findings(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_owned(),
                f["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    all.sort();
    all
}

fn narinfo_key(store_path: &str) -> String {
    format!("{}.narinfo", digest(store_path))
}

/// Puts every file under a folder into an S3 bucket, keyed by its relative path: a cache
/// the real Nix wrote (Debian's Nix has no s3:// support), moved into a bucket as it is.
/// Arguments: endpoint, bucket, folder.
const COPY_INTO_BUCKET: &str = r#"
import os, sys, boto3
ep, bucket, root = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
for d, _, files in os.walk(root):
    for f in files:
        p = os.path.join(d, f)
        with open(p, "rb") as fh:
            s3.put_object(Bucket=bucket, Key=os.path.relpath(p, root), Body=fh.read())
"#;

/// Copies the cache in `dir` into a fresh S3 bucket; its URL.
fn into_s3_bucket(dir: &Path) -> String {
    let (ep, bucket) = new_s3_bucket("fsck-repair");
    let moto = common::peers::peer("NIXCACHED_TEST_MOTO_SERVER");
    let python = Path::new(&moto).with_file_name("python");
    let out = std::process::Command::new(&python)
        .args(["-c", COPY_INTO_BUCKET, &ep, &bucket])
        .arg(dir)
        .output()
        .unwrap();
    common::assert_succeeded(&out);
    format!("s3://{bucket}?endpoint={ep}&region=us-east-1")
}

/// Copies the cache in `dir` into a fresh fake-gcs-server bucket (its JSON API's media
/// upload, one request per file); its URL.
fn into_gcs_bucket(dir: &Path) -> String {
    let (ep, bucket) = new_gcs_bucket("fsck-repair");
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let key = p
                .strip_prefix(dir)
                .unwrap()
                .to_str()
                .unwrap()
                .replace('/', "%2F");
            let (code, body) = curl(&[
                "-X",
                "POST",
                "--data-binary",
                &format!("@{}", p.display()),
                &format!("{ep}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={key}"),
            ]);
            assert_eq!(code, 200, "{key}: {}", String::from_utf8_lossy(&body));
        }
    }
    format!("gs://{bucket}?endpoint={ep}")
}

/// Deletes one object of the cache at `url` (a folder, an S3 or a GCS bucket).
fn delete_object(url: &str, key: &str) {
    if let Some(dir) = url.strip_prefix("file://") {
        fs::remove_file(Path::new(dir).join(key)).unwrap();
        return;
    }
    if let Some((bucket, query)) = url.strip_prefix("gs://").and_then(|r| r.split_once('?')) {
        let ep = query.strip_prefix("endpoint=").unwrap();
        let target = format!("{ep}/storage/v1/b/{bucket}/o/{}", key.replace('/', "%2F"));
        let (code, body) = curl(&["-X", "DELETE", &target]);
        assert!(
            code == 204 || code == 200,
            "DELETE {target}: {code} {}",
            String::from_utf8_lossy(&body)
        );
        return;
    }
    let (bucket, query) = url
        .strip_prefix("s3://")
        .and_then(|r| r.split_once('?'))
        .unwrap();
    let ep = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("endpoint="))
        .unwrap();
    let target = format!("{ep}/{bucket}/{key}");
    let (code, body) = curl(&[
        SIGV4[0], SIGV4[1], SIGV4[2], SIGV4[3], "-X", "DELETE", &target,
    ]);
    assert!(
        code == 204 || code == 200,
        "DELETE {target}: {code} {}",
        String::from_utf8_lossy(&body)
    );
}

/// A cache the real Nix wrote into a folder (xz, signed), broken three ways with the local
/// store holding every path, repaired with `--from-store`, in the folder itself and moved
/// into an S3 and a GCS bucket: each broken path is written again (references first), nothing is
/// removed, and the real Nix substitutes the whole closure from the repaired cache.
#[test]
fn repair_writes_broken_paths_again_from_the_local_store() {
    for bucket in ["", "s3", "gs"] {
        let env = NixEnv::new();
        let closure = env.build_closure();
        let (sk, pk) = env.keypair("fsck-repair-1");
        let dir = env.path("cache");
        env.copy_to(
            &format!(
                "file://{}?compression=xz&secret-key={}",
                dir.display(),
                sk.display()
            ),
            &[&closure.app],
        );
        let ni = |p: &str| dir.join(narinfo_key(p));
        // app: its NAR is gone.
        fs::remove_file(dir.join(nar_url(&ni(&closure.app)))).unwrap();
        // lib: its NAR cut short.
        let lib_nar = dir.join(nar_url(&ni(&closure.lib)));
        let bytes = fs::read(&lib_nar).unwrap();
        fs::write(&lib_nar, &bytes[..bytes.len() - 10]).unwrap();
        // dep: its narinfo is gone, so lib's reference dangles and dep's NAR is an orphan.
        let dep_nar = nar_url(&ni(&closure.dep));
        fs::remove_file(ni(&closure.dep)).unwrap();
        let url = match bucket {
            "s3" => into_s3_bucket(&dir),
            "gs" => into_gcs_bucket(&dir),
            _ => format!("file://{}", dir.display()),
        };

        let store = format!("local?root={}", env.store_arg());
        let sk_arg = sk.display().to_string();
        let (r, code) = report(
            &env,
            &[
                "--repair",
                "--from-store",
                &store,
                "--secret-key-file",
                &sk_arg,
                &url,
            ],
        );
        assert_eq!(code, 1, "{url}: what was found is still reported: {r}");
        let kinds: Vec<String> = findings(&r).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            kinds,
            [
                "dangling-reference",
                "missing-nar",
                "orphan-nar",
                "size-mismatch"
            ],
            "{url}: {r}"
        );
        // References first: lib needs dep, app needs lib.
        assert_eq!(
            strings(&r["reuploaded"]),
            [
                narinfo_key(&closure.dep),
                narinfo_key(&closure.lib),
                narinfo_key(&closure.app)
            ],
            "{url}: {r}"
        );
        assert_eq!(strings(&r["removed"]), Vec::<String>::new(), "{url}");

        // What is left to find is dep's NAR file that lost its narinfo before the repair (the
        // path was written again under the key `upload` gives it); lib's damaged NAR went.
        let (r, code) = report(
            &env,
            &["--verify-content", "--trusted-public-key", &pk, &url],
        );
        assert_eq!(
            (findings(&r), code),
            (vec![("orphan-nar".to_owned(), dep_nar.clone())], 1),
            "{url}: {r}"
        );
        delete_object(&url, &dep_nar);
        let out = fsck(
            &env,
            &["--verify-content", "--trusted-public-key", &pk, &url],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{url}: {}",
            String::from_utf8_lossy(&out.stdout)
        );

        // The real Nix takes the whole closure from the repaired cache, signatures checked.
        let fresh = env.path("fresh-store").display().to_string();
        if !bucket.is_empty() {
            let d = common::Daemon::start(&env, &["serve", &url]);
            env.copy_from(&d.url, &fresh, Some(&pk), &closure.app);
        } else {
            env.copy_from(&url, &fresh, Some(&pk), &closure.app);
        }
        env.verify(&fresh, Some(&pk), &closure.app);
    }
}

/// What the local store does not hold cannot be written again: it goes, with every path that
/// references it (referrers first), while what the store holds (a NAR cut short, a narinfo
/// that does not parse) is written again, and the rest of the cache stays whole for the real
/// Nix.
#[test]
fn repair_removes_what_the_local_store_does_not_hold() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("fsck-repair-2");
    let other_dir = env.path("other");
    fs::write(&other_dir, vec![b'o'; 40_000]).unwrap();
    let other = env.add(&other_dir);
    let dir = env.path("cache");
    let url = format!("file://{}", dir.display());
    env.copy_to(
        &format!("{url}?compression=xz&secret-key={}", sk.display()),
        &[&closure.app, &other],
    );
    // A store that holds `other` and dep, not lib nor app.
    let partial = env.path("partial");
    let partial_arg = partial.display().to_string();
    for p in [&other, &closure.dep] {
        env.copy_from(&env.store_arg(), &partial_arg, None, p);
    }
    let ni = |p: &str| dir.join(narinfo_key(p));
    // lib: its NAR is gone (and the store lacks lib): lib goes, and app, which references it.
    fs::remove_file(dir.join(nar_url(&ni(&closure.lib)))).unwrap();
    // other: its NAR cut short (the store has it): written again.
    let other_nar = dir.join(nar_url(&ni(&other)));
    let bytes = fs::read(&other_nar).unwrap();
    fs::write(&other_nar, &bytes[..bytes.len() - 10]).unwrap();
    // dep: its narinfo does not parse (the store has dep): written again under its name.
    fs::write(ni(&closure.dep), "StorePath: nonsense\n").unwrap();

    let sk_arg = sk.display().to_string();
    let store = format!("local?root={partial_arg}");
    let (r, code) = report(
        &env,
        &[
            "--repair",
            "--from-store",
            &store,
            "--secret-key-file",
            &sk_arg,
            &url,
        ],
    );
    assert_eq!(code, 1, "{r}");
    let mut reuploaded = strings(&r["reuploaded"]);
    reuploaded.sort();
    let mut want = vec![narinfo_key(&other), narinfo_key(&closure.dep)];
    want.sort();
    assert_eq!(reuploaded, want, "{r}");
    assert_eq!(
        strings(&r["removed"]),
        [narinfo_key(&closure.app), narinfo_key(&closure.lib)],
        "referrers first: {r}"
    );

    // Only NAR files are left over, for gc: app's, and dep's, which its unparsable narinfo
    // pointed at (lib's was gone already, other's damaged one went).
    let (r, _) = report(
        &env,
        &["--verify-content", "--trusted-public-key", &pk, &url],
    );
    let kinds: Vec<String> = findings(&r).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["orphan-nar", "orphan-nar"], "{r}");
    let fresh = env.path("fresh-store").display().to_string();
    for p in [&other, &closure.dep] {
        env.copy_from(&url, &fresh, Some(&pk), p);
    }
    env.verify(&fresh, Some(&pk), &other);

    // The table lists what was written again.
    fs::remove_file(dir.join(nar_url(&ni(&other)))).unwrap();
    let out = fsck(&env, &["--repair", "--from-store", &store, &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("reuploaded           {}", narinfo_key(&other))),
        "{text}"
    );
    assert!(text.contains("repair wrote 1 paths again"), "{text}");
}
