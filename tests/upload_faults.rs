//! Faults at the destination of `upload`: a fault-injecting proxy in front of the real S3
//! (moto) and GCS (fake-gcs-server) servers answers 5xx and SlowDown, resets connections in
//! the middle of multipart and resumable uploads, and stalls requests past the stall timeout;
//! a `file://` destination runs out of space. In every case the bucket never holds a narinfo
//! without its NAR and references, no multipart upload is left behind, every path is
//! uploaded once the fault clears (checked by the real Nix), and the journal tells the story.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy, INTERNAL, SLOW_DOWN};
use common::peers::{new_gcs_bucket, new_s3_bucket};
use common::upload::{check_cache, check_consistent, digest, mkfifo, send, SmallFs, Upload};
use common::{Daemon, NixEnv};
use nixcached_actors::upload::journal::{announced_journal, spool_dir, Entry, Journal, State};

/// moto checks no signature, but wants an Authorization header on private objects.
const MOTO_AUTH: &str = "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";

/// A store path holding `mib` MiB of random bytes: a NAR that no codec shrinks and that
/// takes several parts (S3) or chunks (GCS) of 8 MiB.
fn big_path(env: &NixEnv, mib: usize) -> String {
    let d = env.path("big");
    std::fs::create_dir_all(&d).unwrap();
    let mut data = vec![0u8; mib << 20];
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, &mut data).unwrap();
    std::fs::write(d.join("blob"), data).unwrap();
    env.add(&d)
}

/// The journal of the uploader reading `fifo`.
fn journal_of(fifo: &Path) -> Journal {
    let path = announced_journal(&spool_dir(fifo)).expect("the uploader names its journal");
    Journal::open(&path).unwrap()
}

/// Waits until the journal has settled every root (at most `secs`), calling `watch` between
/// looks; returns each root's entry.
fn wait_settled(
    journal: &Journal,
    roots: &[&str],
    secs: u64,
    mut watch: impl FnMut(),
) -> Vec<Entry> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        watch();
        // A root not journaled yet (the uploader has not read it) counts as pending.
        let entries: Vec<Option<Entry>> = roots.iter().map(|r| journal.entry(r).unwrap()).collect();
        if entries
            .iter()
            .all(|e| e.as_ref().is_some_and(|e| e.state != State::Pending))
        {
            return entries.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "not settled after {secs} s: {entries:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The text between each `<tag>` and `</tag>` in an XML answer.
fn xml_values<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split(&close).next())
        .collect()
}

/// An S3 bucket on moto, read directly (not through the proxy).
struct S3Bucket {
    endpoint: String,
    bucket: String,
}

impl S3Bucket {
    fn objects(&self) -> BTreeMap<String, u64> {
        let (code, body) = common::curl(&[
            "-H",
            MOTO_AUTH,
            &format!("{}/{}?list-type=2", self.endpoint, self.bucket),
        ]);
        assert_eq!(code, 200);
        let xml = String::from_utf8(body).unwrap();
        xml_values(&xml, "Contents")
            .into_iter()
            .map(|c| {
                let key = xml_values(c, "Key")[0].to_owned();
                let size = xml_values(c, "Size")[0].parse().unwrap();
                (key, size)
            })
            .collect()
    }

    fn get(&self, key: &str) -> Vec<u8> {
        let (code, body) = common::curl(&[
            "-H",
            MOTO_AUTH,
            &format!("{}/{}/{key}", self.endpoint, self.bucket),
        ]);
        assert_eq!(code, 200, "{key}");
        body
    }

    /// Multipart uploads started and neither completed nor aborted.
    fn unfinished_multipart(&self) -> Vec<String> {
        let (code, body) = common::curl(&[
            "-H",
            MOTO_AUTH,
            &format!("{}/{}?uploads", self.endpoint, self.bucket),
        ]);
        assert_eq!(code, 200);
        let xml = String::from_utf8(body).unwrap();
        xml_values(&xml, "Upload")
            .into_iter()
            .map(str::to_owned)
            .collect()
    }
}

/// Each of the proxy's `n` rules gave its fault at least once: the run went through them all.
fn assert_every_fault_fired(proxy: &FaultProxy, n: usize) {
    let hits = proxy.hits();
    assert!(
        hits.len() == n && hits.iter().all(|&h| h > 0),
        "not every fault fired (hits per rule: {hits:?}):\n{}",
        proxy.seen().join("\n")
    );
}

/// Substitutes `paths` from the bucket (served by nixcached, no fault) into a fresh store,
/// and lets the real Nix verify them.
fn nix_checks(env: &NixEnv, url: &str, paths: &[&str], tag: &str) {
    let d = Daemon::start(env, &["serve", url]);
    let fresh = env.path(&format!("fresh-{tag}"));
    for p in paths {
        env.copy_from(&d.url, fresh.to_str().unwrap(), None, p);
        env.verify(fresh.to_str().unwrap(), None, p);
    }
}

#[test]
fn s3_faults_mid_multipart_lose_nothing_and_leave_no_parts_behind() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let big = big_path(&env, 20);
    let (moto, bucket) = new_s3_bucket("faults");
    let proxy = FaultProxy::start(&moto);
    let s3 = S3Bucket {
        endpoint: moto.clone(),
        bucket: bucket.clone(),
    };
    let url = format!(
        "s3://{bucket}?endpoint={}&region=us-east-1&stall-timeout=2",
        proxy.endpoint()
    );
    let fifo = env.path("fifo");
    mkfifo(&fifo);
    let up = Upload::start(&env, &fifo, &url, &["--compression", "none", "--jobs", "2"]);

    // A 20 MiB NAR goes up in three parts: the second is cut off midway (twice), the third
    // hangs past the stall timeout, completing fails and so does aborting (so the parts must
    // be aborted later), and narinfo writes are told to slow down more often than the S3
    // client retries by itself.
    let rules: &[(&str, &[&str], Fault, usize)] = &[
        ("PUT", &["partNumber=2"], Fault::ResetAfter(1 << 20), 2),
        ("PUT", &["partNumber=3"], Fault::Stall, 1),
        ("POST", &["uploadId="], INTERNAL, 5),
        ("DELETE", &["uploadId="], INTERNAL, 5),
        ("PUT", &[".narinfo"], SLOW_DOWN, 6),
        ("PUT", &[".ls"], INTERNAL, 2),
    ];
    for (method, contains, fault, n) in rules {
        proxy.inject(method, contains, fault.clone(), Some(*n));
    }
    let out = send(&fifo, &[&big, &closure.app], &[]);
    common::assert_succeeded(&out);

    let journal = journal_of(&fifo);
    let mut looks = 0;
    let entries = wait_settled(&journal, &[&big, &closure.app], 240, || {
        // At every moment, whatever the faults, the bucket is consistent.
        check_cache(&s3.objects(), |k| s3.get(k));
        looks += 1;
    });
    assert_every_fault_fired(&proxy, rules.len());
    let log = up.log_text();
    for e in &entries {
        assert_eq!(e.state, State::Done, "{e:?}\n{log}");
    }
    // The journal says what the big path went through.
    assert!(entries[0].retries >= 1, "{:?}", entries[0]);
    assert!(entries[0].last_error.is_some(), "{:?}", entries[0]);
    assert_eq!(s3.unfinished_multipart(), Vec::<String>::new(), "{log}");
    assert!(
        log.contains("cannot abort an unfinished multipart upload yet")
            && log.contains("aborted an unfinished multipart upload"),
        "the failed abort was not retried:\n{log}"
    );
    assert_eq!(
        check_cache(&s3.objects(), |k| s3.get(k)).len(),
        closure.paths.len() + 1
    );
    assert!(looks > 3, "the bucket was looked at {looks} times only");

    // Shown with --nocapture: what each request got, and what the uploader said.
    println!("{}\n{}", proxy.seen().join("\n"), up.log_text());
    up.drain();
    drop(proxy);
    let direct = format!("s3://{bucket}?endpoint={moto}&region=us-east-1");
    nix_checks(&env, &direct, &[&big, &closure.app], "s3");
}

/// A GCS bucket on fake-gcs-server, read directly.
struct GcsBucket {
    endpoint: String,
    bucket: String,
}

impl GcsBucket {
    fn objects(&self) -> BTreeMap<String, u64> {
        let (code, body) =
            common::curl(&[&format!("{}/storage/v1/b/{}/o", self.endpoint, self.bucket)]);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        (
                            i["name"].as_str().unwrap().to_owned(),
                            i["size"].as_str().unwrap().parse().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn get(&self, key: &str) -> Vec<u8> {
        let (code, body) = common::curl(&[&format!(
            "{}/storage/v1/b/{}/o/{}?alt=media",
            self.endpoint,
            self.bucket,
            key.replace('/', "%2F")
        )]);
        assert_eq!(code, 200, "{key}");
        body
    }
}

#[test]
fn gcs_faults_mid_resumable_upload_lose_nothing() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let big = big_path(&env, 20);
    let (ep, bucket) = new_gcs_bucket("faults");
    let proxy = FaultProxy::start(&ep);
    let gcs = GcsBucket {
        endpoint: ep.clone(),
        bucket: bucket.clone(),
    };
    let url = format!(
        "gs://{bucket}?endpoint={}&stall-timeout=2",
        proxy.endpoint()
    );
    let fifo = env.path("fifo");
    mkfifo(&fifo);
    let up = Upload::start(&env, &fifo, &url, &["--compression", "none", "--jobs", "2"]);

    // The resumable upload of a 20 MiB NAR fails to start twice; its chunks are cut off
    // midway, hang past the stall timeout and get 500s, more often than one chunk is retried
    // (so the upload is cancelled and started again); narinfo writes are told to slow down.
    let rules: &[(&str, &[&str], Fault, usize)] = &[
        ("POST", &["uploadType=resumable"], INTERNAL, 2),
        ("PUT", &["upload"], Fault::ResetAfter(1 << 20), 2),
        ("PUT", &["upload"], Fault::Stall, 1),
        ("PUT", &["upload"], INTERNAL, 3),
        ("POST", &["uploadType=media", ".narinfo"], SLOW_DOWN, 6),
    ];
    for (method, contains, fault, n) in rules {
        proxy.inject(method, contains, fault.clone(), Some(*n));
    }
    let out = send(&fifo, &[&big, &closure.app], &[]);
    common::assert_succeeded(&out);

    let journal = journal_of(&fifo);
    let entries = wait_settled(&journal, &[&big, &closure.app], 240, || {
        check_cache(&gcs.objects(), |k| gcs.get(k));
    });
    assert_every_fault_fired(&proxy, rules.len());
    let log = up.log_text();
    for e in &entries {
        assert_eq!(e.state, State::Done, "{e:?}\n{log}");
    }
    let total_retries: i64 = entries.iter().map(|e| e.retries).sum();
    assert!(total_retries >= 1, "{entries:?}");
    assert_eq!(
        check_cache(&gcs.objects(), |k| gcs.get(k)).len(),
        closure.paths.len() + 1
    );

    // Shown with --nocapture: what each request got, and what the uploader said.
    println!("{}\n{}", proxy.seen().join("\n"), up.log_text());
    up.drain();
    drop(proxy);
    nix_checks(
        &env,
        &format!("gs://{bucket}?endpoint={ep}"),
        &[&big, &closure.app],
        "gcs",
    );
}

#[test]
fn a_full_file_destination_uploads_everything_once_space_is_freed() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let big = big_path(&env, 16);
    let small = SmallFs::mount(env.path("small"), "6m");
    let cache = small.0.join("cache");
    let fifo = env.path("fifo");
    mkfifo(&fifo);
    let url = format!("file://{}", cache.display());
    let up = Upload::start(&env, &fifo, &url, &["--compression", "none"]);
    let out = send(&fifo, &[&big, &closure.app], &[]);
    common::assert_succeeded(&out);

    // The small closure fits and goes up; the 16 MiB path cannot, and is retried.
    let journal = journal_of(&fifo);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_consistent(&cache);
        // Not journaled yet counts as no retries.
        let e = journal.entry(&big).unwrap();
        let app_done = journal
            .entry(&closure.app)
            .unwrap()
            .is_some_and(|e| e.state == State::Done);
        if let Some(e) = e.as_ref().filter(|e| e.retries >= 2 && app_done) {
            assert_eq!(e.state, State::Pending, "{e:?}");
            let why = e.last_error.as_deref().unwrap_or_default();
            assert!(why.contains("No space left on device"), "{why}");
            break;
        }
        assert!(Instant::now() < deadline, "{e:?}\n{}", up.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!cache.join(format!("{}.narinfo", digest(&big))).exists());
    // Nothing half-written stays behind to fill the disk.
    let mut files = BTreeSet::new();
    for dir in [cache.clone(), cache.join("nar")] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            files.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    assert!(
        files.iter().all(|f| !f.starts_with(".nixcached-tmp-")),
        "{files:?}"
    );
    assert!(up.log_text().contains("No space left on device"));

    small.resize("64m");
    let entries = wait_settled(&journal, &[&big, &closure.app], 120, || {
        check_consistent(&cache);
    });
    assert!(
        entries.iter().all(|e| e.state == State::Done),
        "{entries:?}"
    );
    assert_eq!(check_consistent(&cache), closure.paths.len() + 1);
    println!("{}", up.log_text());
    up.drain();
    let fresh = env.path("fresh");
    for p in [&big, &closure.app] {
        env.copy_from(&url, fresh.to_str().unwrap(), None, p);
        env.verify(fresh.to_str().unwrap(), None, p);
    }
}
