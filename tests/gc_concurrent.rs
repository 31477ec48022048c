//! `gc` on a bucket that is in use, as users scale out: two `serve` processes and two uploaders
//! on one S3 (moto) bucket while a collection runs. A watcher reads the bucket the whole time
//! and clients fetch through both servers: no narinfo is ever seen without its NAR or the
//! narinfos of its references, no server hands out a narinfo whose NAR answers 404, nothing an
//! uploader writes during the collection is removed, and the garbage is.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::peers::new_s3_bucket;
use common::upload::{digest, many_paths_named, mkfifo, send, Upload};
use common::NixEnv;
use nixcached_actors::formats::Digest;
use nixcached_actors::store::binary_cache::BinaryCache;
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::store::{Store, StoreError};

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");
/// Short, so that the garbage is old enough to go after a short wait.
const GRACE_SECS: u64 = 12;

/// One look at the whole bucket: every narinfo read has its NAR and its references, unless it
/// was removed meanwhile (looked at again after the check). Returns the narinfos seen.
async fn look(cache: &BinaryCache) -> Result<usize, String> {
    let digests = cache.list().await.map_err(|e| e.to_string())?;
    let blobs = cache.blobs();
    let exists = |key: String| async move {
        blobs
            .head(&key)
            .await
            .map(|h| h.is_some())
            .map_err(|e| e.to_string())
    };
    let mut seen = 0;
    for d in digests {
        let info = match cache.narinfo(&d).await {
            Ok(i) => i,
            Err(StoreError::NotFound(_)) => continue, // removed since the listing
            Err(e) => return Err(format!("{d}.narinfo: {e}")),
        };
        seen += 1;
        let mut missing = Vec::new();
        if !exists(info.url.clone()).await? {
            missing.push(info.url.clone());
        }
        for r in &info.references {
            if r.digest() != &d && !exists(format!("{}.narinfo", r.digest())).await? {
                missing.push(format!("{}.narinfo", r.digest()));
            }
        }
        // Referrers go first, so a missing reference is a fault only while the referrer is
        // still there after it was found missing.
        if !missing.is_empty() && exists(format!("{d}.narinfo")).await? {
            return Err(format!("{d}.narinfo is there without {missing:?}"));
        }
    }
    Ok(seen)
}

/// `nixcached upload` of `paths` (with their closures) into `cache`, from an input file named
/// for `tag`, until done.
fn upload_once(env: &NixEnv, cache: &str, paths: &[&str], tag: &str) {
    let input = env.path(&format!("input-{tag}"));
    fs::write(&input, paths.join("\n") + "\n").unwrap();
    let state = env.path(&format!("state-{tag}"));
    let out = env
        .cmd(BIN)
        .args(["upload", "--input", input.to_str().unwrap()])
        .args([
            "--progress-interval",
            "0",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .args(["--from", &format!("local?root={}", env.store_arg()), cache])
        .output()
        .unwrap();
    common::assert_succeeded(&out);
}

#[test]
fn gc_with_two_servers_and_two_uploaders_on_one_bucket() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let garbage = many_paths_named(&env, 12, "garbage");
    let fresh_a = many_paths_named(&env, 10, "fresh-a");
    let fresh_b = many_paths_named(&env, 10, "fresh-b");
    let (ep, bucket) = new_s3_bucket("gc-busy");
    let cache = format!("s3://{bucket}?endpoint={ep}&region=us-east-1");

    // Before: the garbage and the kept closure, uploaded, then left to age past the grace.
    let before: Vec<&str> = garbage
        .iter()
        .map(String::as_str)
        .chain([closure.app.as_str()])
        .collect();
    upload_once(&env, &cache, &before, "before");
    std::thread::sleep(Duration::from_secs(GRACE_SECS + 1));

    let servers = [
        common::Daemon::start(&env, &["serve", "--no-access-records", &cache]),
        common::Daemon::start(&env, &["serve", "--no-access-records", &cache]),
    ];
    let fifos = [env.path("fifo-a"), env.path("fifo-b")];
    let uploaders: Vec<Upload> = fifos
        .iter()
        .map(|f| {
            mkfifo(f);
            Upload::start(&env, f, &cache, &["--jobs", "2"])
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    // The watcher: the bucket, as any reader sees it.
    let watcher = {
        let (stop, cache) = (stop.clone(), cache.clone());
        std::thread::spawn(move || {
            let blobs = StoreUrl::parse(&cache).unwrap().open_blobs().unwrap();
            let bc = BinaryCache::new(blobs);
            let mut looks = 0;
            while !stop.load(Ordering::SeqCst) {
                common::block_on(look(&bc))?;
                looks += 1;
            }
            Ok::<_, String>(looks)
        })
    };
    // Clients: a narinfo a server hands out has a NAR that server hands out too.
    let every: Vec<String> = garbage
        .iter()
        .chain(&fresh_a)
        .chain(&fresh_b)
        .chain(&closure.paths)
        .cloned()
        .collect();
    let client = {
        let stop = stop.clone();
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        let every = every.clone();
        std::thread::spawn(move || {
            let mut checked = 0;
            while !stop.load(Ordering::SeqCst) {
                for (i, p) in every.iter().enumerate() {
                    let url = &urls[i % 2];
                    let (code, body) = common::curl(&[&format!("{url}/{}.narinfo", digest(p))]);
                    if code != 200 {
                        continue;
                    }
                    let text = String::from_utf8(body).unwrap();
                    let nar = text
                        .lines()
                        .find_map(|l| l.strip_prefix("URL: "))
                        .unwrap()
                        .to_owned();
                    let (code, _) = common::curl(&["-r", "0-99", &format!("{url}/{nar}")]);
                    if code != 206 && code != 200 {
                        return Err(format!("{url}: {p}'s narinfo but {nar} answers {code}"));
                    }
                    checked += 1;
                }
            }
            Ok(checked)
        })
    };

    // The uploaders get new paths while the collection runs.
    let senders: Vec<_> = fifos
        .iter()
        .zip([&fresh_a, &fresh_b])
        .map(|(fifo, paths)| {
            let (fifo, paths) = (fifo.clone(), paths.clone());
            std::thread::spawn(move || {
                for p in &paths {
                    let out = send(&fifo, &[p], &["--timeout", "30s"]);
                    common::assert_succeeded(&out);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    let keep = env.path("keep");
    fs::write(&keep, format!("{}\n", closure.app)).unwrap();
    // Three collections while the uploads land.
    let mut removed: BTreeSet<String> = BTreeSet::new();
    let mut reports = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let out = env
            .cmd(BIN)
            .args([
                "gc",
                "--json",
                "--jobs",
                "4",
                "--keep",
                keep.to_str().unwrap(),
            ])
            .args(["--grace", &format!("{GRACE_SECS}s"), &cache])
            .output()
            .unwrap();
        common::assert_succeeded(&out);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        removed.extend(
            report["removed_narinfos"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned()),
        );
        reports.push(report);
    }
    let report = serde_json::Value::Array(reports);

    for s in senders {
        s.join().unwrap();
    }
    for u in uploaders {
        u.drain();
    }
    // A last look after everything settled, then the watcher and the client stop.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let looks = watcher
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("watcher: {e}"));
    let checked = client
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("client: {e}"));
    eprintln!("watcher looked {looks} times, clients checked {checked} narinfos; gc: {report}");
    assert!(looks >= 3, "the watcher looked only {looks} times");
    assert!(
        checked > every.len(),
        "clients checked only {checked} narinfos"
    );

    // The garbage went, the rest is all there and whole.
    let want: BTreeSet<String> = garbage
        .iter()
        .map(|p| format!("{}.narinfo", digest(p)))
        .collect();
    assert_eq!(removed, want, "{report}");
    let blobs = StoreUrl::parse(&cache).unwrap().open_blobs().unwrap();
    let bc = BinaryCache::new(blobs);
    let left: BTreeSet<Digest> = common::block_on(bc.list()).unwrap().into_iter().collect();
    for p in fresh_a.iter().chain(&fresh_b).chain(&closure.paths) {
        let d = Digest::parse(digest(p)).unwrap();
        assert!(left.contains(&d), "{p} is gone");
    }
    assert_eq!(
        left.len(),
        fresh_a.len() + fresh_b.len() + closure.paths.len()
    );
    common::block_on(look(&bc)).unwrap();
    // The real Nix substitutes through either server.
    for (i, s) in servers.iter().enumerate() {
        let to = env.path(&format!("sub-{i}"));
        env.copy_from(&s.url, to.to_str().unwrap(), None, &closure.app);
        env.copy_from(&s.url, to.to_str().unwrap(), None, &fresh_a[i]);
    }
    // The watcher can fail: with a referenced narinfo taken away by hand, it objects.
    common::block_on(
        bc.blobs()
            .delete(&format!("{}.narinfo", digest(&closure.dep))),
    )
    .unwrap();
    let err = common::block_on(look(&bc)).unwrap_err();
    assert!(err.contains(digest(&closure.dep)), "{err}");
}

/// The race a collection cannot see: an uploader finds a reference already in the cache, spends
/// seconds on its referrer's NAR, and a collection removes the reference meanwhile (it is old
/// and nothing in the cache references it yet). The uploader looks again just before it writes
/// the narinfo and writes the reference again first, so the narinfo never lands without it.
#[test]
fn a_reference_removed_while_its_referrer_uploads_is_written_again_first() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let dir = env.path("cache");
    let cache = format!("file://{}", dir.display());
    // The reference, uploaded long ago (as far as gc can tell).
    upload_once(&env, &cache, &[&closure.dep], "dep");
    let dep_key = format!("{}.narinfo", digest(&closure.dep));
    let two_days = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    for e in fs::read_dir(&dir)
        .unwrap()
        .chain(fs::read_dir(dir.join("nar")).unwrap())
    {
        let p = e.unwrap().path();
        if p.is_file() {
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(two_days)
                .unwrap();
        }
    }

    // A referrer with a NAR that takes seconds to compress (random bytes, xz).
    // busybox, as build_closure added it (the same contents, the same store path).
    let bb = env.add(&env.path("bbdir"));
    let nix = env.path("big.nix");
    fs::write(
        &nix,
        format!(
            r#"let bb = builtins.storePath "{bb}"; dep = builtins.storePath "{dep}"; in
builtins.derivation {{ name = "big"; system = builtins.currentSystem;
  builder = "${{bb}}/bin/busybox"; PATH = "${{bb}}/bin";
  args = [ "sh" "-c" "mkdir -p $out && echo ${{dep}} > $out/ref && head -c 16000000 /dev/urandom > $out/big" ]; }}"#,
            dep = closure.dep
        ),
    )
    .unwrap();
    let big = env
        .run(
            "nix-build",
            &[
                "--store",
                &env.store_arg(),
                nix.to_str().unwrap(),
                "--no-out-link",
            ],
        )
        .trim()
        .to_owned();

    let fifo = env.path("fifo");
    mkfifo(&fifo);
    let up = Upload::start(&env, &fifo, &cache, &["--compression", "xz"]);
    common::assert_succeeded(&send(&fifo, &[&big], &["--timeout", "30s"]));
    // The referrer's NAR is on its way; the reference was found present.
    let base = big.trim_start_matches("/nix/store/");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !up.log_text().contains(&format!("uploading {base}")) {
        assert!(std::time::Instant::now() < deadline, "{}", up.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dir.join(&dep_key).exists() && !dir.join(format!("{}.narinfo", digest(&big))).exists());
    // The collection: the reference is old and nothing references it yet.
    let out = env
        .cmd(BIN)
        .args(["gc", "--json", "--max-age", "1h", "--grace", "0s", &cache])
        .output()
        .unwrap();
    common::assert_succeeded(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["removed_narinfos"][0], dep_key.as_str(), "{report}");
    assert!(
        !dir.join(format!("{}.narinfo", digest(&big))).exists(),
        "the upload finished before the collection: the race was not run"
    );
    let log = up.log.clone();
    up.drain();
    let log = fs::read_to_string(log).unwrap();

    assert!(
        dir.join(format!("{}.narinfo", digest(&big))).exists(),
        "{log}"
    );
    assert!(
        dir.join(&dep_key).exists(),
        "{} was written without its reference {}: {log}",
        big,
        closure.dep
    );
    assert!(log.contains("writing it again first"), "{log}");
    let fresh = env.path("fresh");
    env.copy_from(&cache, fresh.to_str().unwrap(), None, &big);
}
