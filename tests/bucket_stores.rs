//! The conformance suite against real bucket servers: S3 (moto) and GCS (fake-gcs-server),
//! both started by scripts/test. Each test gets a fresh bucket, publishes the fixture
//! closure into it from a local chroot store, and runs the same checks as every backend.

mod common;

use common::peers::{fresh_name, new_gcs_bucket as gcs_bucket, new_s3_bucket as s3_bucket};

use std::sync::Arc;

use bytes::Bytes;
use common::conformance::{fixture, suite};
use common::{block_on, curl_headers, NixEnv};
use futures::StreamExt;
use nixcached_actors::formats::{Compression, StoreDir};
use nixcached_actors::publish::{publish, PublishOptions};
use nixcached_actors::store::binary_cache::BinaryCache;
use nixcached_actors::store::blobs::Blobs;
use nixcached_actors::store::gcs::GcsBlobs;
use nixcached_actors::store::local::{LocalStore, LocalStoreLayout};
use nixcached_actors::store::s3::S3Blobs;
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::store::{ByteRange, ByteStream, Store, StoreError};
use sha2::{Digest, Sha256};

/// Opens the object storage a bucket URL names, through the URL parser users go through.
fn blobs(url: &str) -> Arc<dyn Blobs> {
    match StoreUrl::parse(url).unwrap() {
        StoreUrl::S3(o) => Arc::new(S3Blobs::open(&o).unwrap()),
        StoreUrl::Gcs(o) => Arc::new(GcsBlobs::open(&o).unwrap()),
        other => panic!("{url} is not a bucket URL: {other:?}"),
    }
}

/// Publishes the fixture closure into the cache at `url` and runs the conformance suite.
fn publish_and_check(url: &str) {
    let env = NixEnv::new();
    let fx = fixture(&env);
    let local: Arc<dyn Store> =
        Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    let cache = BinaryCache::new(blobs(url));
    block_on(async {
        cache.ensure_cache_info(&StoreDir::default()).await.unwrap();
        for (digest, ..) in &fx.objects {
            let opts = PublishOptions {
                compression: Compression::Xz,
                ..PublishOptions::default()
            };
            publish(&*local, &cache, digest, &opts).await.unwrap();
        }
        suite(Arc::new(cache.clone()), &fx, true).await;
    });
    // The public entry point opens the same cache.
    let opened = StoreUrl::parse(url).unwrap().open().unwrap();
    let listed = block_on(opened.list()).unwrap();
    assert_eq!(listed.len(), fx.objects.len(), "{url}: {listed:?}");
}

#[test]
fn s3_bucket_conformance() {
    let (ep, bucket) = s3_bucket("conformance");
    publish_and_check(&format!("s3://{bucket}?endpoint={ep}&region=us-east-1"));
}

#[test]
fn s3_bucket_with_prefix_in_the_readme_dialect() {
    let (ep, bucket) = s3_bucket("prefix");
    let host = ep.trim_start_matches("http://");
    publish_and_check(&format!(
        "s3://{bucket}?endpoint={host}&disableSSL=true&s3ForcePathStyle=true&prefix=some/cache/"
    ));
    // Everything went under the prefix: the bucket's root holds no cache.
    let root = blobs(&format!(
        "s3://{bucket}?endpoint={host}&scheme=http&addressing-style=path"
    ));
    block_on(async {
        assert!(root.list("").await.unwrap().is_empty());
        assert!(root
            .head("some/cache/nix-cache-info")
            .await
            .unwrap()
            .is_some());
        assert!(!root.list("some/cache/").await.unwrap().is_empty());
    });
}

#[test]
fn gcs_bucket_conformance() {
    let (ep, bucket) = gcs_bucket("conformance");
    publish_and_check(&format!("gs://{bucket}?endpoint={ep}"));
}

#[test]
fn gcs_bucket_with_prefix() {
    let (ep, bucket) = gcs_bucket("prefix");
    publish_and_check(&format!("gs://{bucket}?prefix=/some/cache&endpoint={ep}"));
    let root = blobs(&format!(
        "gs://{bucket}?endpoint={}",
        ep.trim_start_matches("http://")
    ));
    block_on(async {
        assert!(root.list("").await.unwrap().is_empty());
        assert!(root
            .head("some/cache/nix-cache-info")
            .await
            .unwrap()
            .is_some());
    });
}

/// 20 MiB in uneven pieces: more than one S3 part and one GCS chunk.
fn medium_stream(fail_after: Option<usize>) -> (ByteStream, Vec<u8>) {
    let mut data = vec![0u8; 20 * 1024 * 1024 + 12345];
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let pieces: Vec<std::io::Result<Bytes>> = data
        .chunks(777_777)
        .enumerate()
        .map(|(i, c)| match fail_after {
            Some(n) if i * 777_777 >= n => Err(std::io::Error::other("source broke")),
            _ => Ok(Bytes::copy_from_slice(c)),
        })
        .collect();
    (Box::pin(futures::stream::iter(pieces)), data)
}

async fn read_all(blobs: &dyn Blobs, key: &str, range: Option<ByteRange>) -> Vec<u8> {
    let mut blob = blobs.get(key, range).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = blob.stream.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// Writes that span several parts/chunks read back whole and in slices, and a write whose
/// source fails leaves nothing behind.
async fn multi_part_writes(blobs: Arc<dyn Blobs>) {
    let (stream, data) = medium_stream(None);
    let n = blobs
        .put("nar/medium.nar", stream, "application/x-nix-nar")
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(blobs.head("nar/medium.nar").await.unwrap(), Some(n));
    let back = read_all(&*blobs, "nar/medium.nar", None).await;
    assert!(
        Sha256::digest(&back) == Sha256::digest(&data),
        "{}",
        blobs.describe()
    );
    let (a, b) = (8 * 1024 * 1024 - 5, 8 * 1024 * 1024 + 5);
    let part = read_all(&*blobs, "nar/medium.nar", Some(ByteRange::span(a, Some(b)))).await;
    assert!(part == data[a as usize..b as usize]);

    let (broken, _) = medium_stream(Some(10 * 1024 * 1024));
    assert!(blobs
        .put("nar/broken.nar", broken, "application/x-nix-nar")
        .await
        .is_err());
    assert_eq!(blobs.head("nar/broken.nar").await.unwrap(), None);
}

#[test]
fn s3_multipart_writes() {
    let (ep, bucket) = s3_bucket("multipart");
    block_on(multi_part_writes(blobs(&format!(
        "s3://{bucket}?endpoint={ep}"
    ))));
    // S3 names a multipart object's ETag after its parts ("<md5 of the part MD5s>-<parts>"),
    // where one PUT gets a plain MD5: 20 MiB in 8 MiB parts is three.
    let (code, headers) = curl_headers(&[&format!("{ep}/{bucket}/nar/medium.nar")]);
    assert_eq!(code, 200);
    let etag = headers
        .iter()
        .find(|(k, _)| k == "etag")
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no ETag in {headers:?}"));
    assert!(etag.ends_with("-3"), "ETag {etag}: not a 3-part upload");
}

/// A cache the real Nix wrote (as a folder: Debian's Nix has no s3:// support), copied into
/// a bucket object by object with boto3, served by `nixcached serve s3://…` and substituted
/// from by the real Nix: our reader against another writer's bucket.
#[test]
fn nix_substitutes_through_serve_from_a_bucket_nix_wrote() {
    let (ep, bucket) = s3_bucket("nix-written");
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("bucket-nix-1");
    let dir = env.path("by-nix");
    env.copy_to(
        &format!(
            "file://{}?compression=xz&write-nar-listing=true&secret-key={}",
            dir.display(),
            sk.display()
        ),
        &[&closure.app],
    );
    let moto = common::peers::peer("NIXCACHED_TEST_MOTO_SERVER");
    let python = std::path::Path::new(&moto).with_file_name("python");
    let out = std::process::Command::new(&python)
        .args(["-c", COPY_INTO_BUCKET, &ep, &bucket])
        .arg(&dir)
        .output()
        .unwrap();
    common::assert_succeeded(&out);
    let copied: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // nix-cache-info, then a narinfo, a listing and a NAR per path.
    assert_eq!(copied, 1 + 3 * closure.paths.len());

    let d = common::Daemon::start(
        &env,
        &[
            "serve",
            &format!("s3://{bucket}?endpoint={ep}&region=us-east-1"),
        ],
    );
    env.substitute_from(&d.url, &closure.app, &pk, "s3");
    for p in &closure.paths {
        let digest = &p["/nix/store/".len()..][..32];
        let (code, body) = common::curl(&[&format!("{}/{digest}.ls", d.url)]);
        assert_eq!(code, 200, "{p}.ls");
        assert!(
            body == std::fs::read(dir.join(format!("{digest}.ls"))).unwrap(),
            "{p}.ls differs from Nix's"
        );
    }
}

/// Puts every file under a folder into a bucket, keyed by its relative path; prints how
/// many. Arguments: endpoint, bucket, folder.
const COPY_INTO_BUCKET: &str = r#"
import os, sys, boto3
ep, bucket, root = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
n = 0
for d, _, files in os.walk(root):
    for f in files:
        p = os.path.join(d, f)
        with open(p, "rb") as fh:
            s3.put_object(Bucket=bucket, Key=os.path.relpath(p, root), Body=fh.read())
        n += 1
print(n)
"#;

#[test]
fn gcs_resumable_writes() {
    let (ep, bucket) = gcs_bucket("resumable");
    block_on(multi_part_writes(blobs(&format!(
        "gs://{bucket}?endpoint={ep}"
    ))));
}

/// Missing buckets, missing objects and unreachable servers each say what they are.
async fn errors_in_user_terms(
    present: Arc<dyn Blobs>,
    absent: Arc<dyn Blobs>,
    down: Arc<dyn Blobs>,
) {
    assert!(matches!(
        present.get("nar/missing.nar", None).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(present.head("nar/missing.nar").await.unwrap(), None);

    let e = absent.get("nix-cache-info", None).await.unwrap_err();
    eprintln!("missing bucket: {e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = absent.head("x.narinfo").await.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = absent.list("").await.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = absent
        .put("x", common::conformance::bytes_stream(b"x"), "text/plain")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");

    let started = std::time::Instant::now();
    let e = down.head("nix-cache-info").await.unwrap_err();
    eprintln!("unreachable after {:?}: {e}", started.elapsed());
    assert!(e.to_string().contains("cannot reach"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "gave up after {:?}",
        started.elapsed()
    );
}

#[test]
fn s3_errors() {
    let (ep, bucket) = s3_bucket("errors");
    block_on(errors_in_user_terms(
        blobs(&format!("s3://{bucket}?endpoint={ep}")),
        blobs(&format!("s3://{}?endpoint={ep}", fresh_name("absent"))),
        blobs(&format!("s3://{bucket}?endpoint=http://127.0.0.1:9")),
    ));
    let e = StoreUrl::parse("s3://b?endpont=x").unwrap_err().to_string();
    eprintln!("unknown parameter: {e}");
    assert!(e.contains("endpont") && e.contains("endpoint"), "{e}");
}

#[test]
fn gcs_errors() {
    let (ep, bucket) = gcs_bucket("errors");
    block_on(errors_in_user_terms(
        blobs(&format!("gs://{bucket}?endpoint={ep}")),
        blobs(&format!("gs://{}?endpoint={ep}", fresh_name("absent"))),
        blobs(&format!("gs://{bucket}?endpoint=http://127.0.0.1:9")),
    ));
    let e = StoreUrl::parse("gs://b?prefx=x").unwrap_err().to_string();
    assert!(e.contains("prefx") && e.contains("prefix"), "{e}");
}
