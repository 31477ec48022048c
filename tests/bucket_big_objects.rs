//! A 1 GiB object through each bucket backend, both ways, in bounded memory.
//!
//! The object is generated on the fly, written with `put_nar`, read back as a stream and
//! hashed; the test process's peak RSS must not grow by more than a few parts' worth. This
//! file holds one test so that nothing else shares the process and its high-water mark.

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::block_on;
use futures::StreamExt;
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::store::ByteStream;
use sha2::{Digest, Sha256};

const SIZE: u64 = 1 << 30;
const PIECE: usize = 256 * 1024;
/// Growth allowed over the resident set before the transfer.
const BUDGET_KIB: u64 = 100 * 1024;

fn peer(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run these tests through scripts/test, which starts moto and fake-gcs-server")
    })
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"))
}

/// Resets the peak-RSS mark to the current RSS (Linux `clear_refs` 5), so each backend is
/// measured on its own; returns the RSS it starts from.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM");
    status_kib("VmRSS:")
}

/// `SIZE` pseudo-random bytes, made as they are consumed; the digest is known once the
/// stream ends.
fn generated() -> (
    ByteStream,
    std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
) {
    let digest = std::sync::Arc::new(std::sync::Mutex::new(None));
    let out = digest.clone();
    let state = (0u64, 0x2545f4914f6cdd1du64, Sha256::new());
    let stream = futures::stream::unfold(Some(state), move |st| {
        let out = out.clone();
        async move {
            let (done, mut x, mut hasher) = st?;
            if done == SIZE {
                *out.lock().unwrap() = Some(hasher.finalize().to_vec());
                return None;
            }
            let n = PIECE.min((SIZE - done) as usize);
            let mut buf = vec![0u8; n];
            for word in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
            }
            hasher.update(&buf);
            Some((Ok(Bytes::from(buf)), Some((done + n as u64, x, hasher))))
        }
    });
    (Box::pin(stream), digest)
}

/// Puts and gets 1 GiB through the store at `url`; returns (peak growth KiB, put s, get s).
fn round_trip(url: &str) -> (u64, f64, f64) {
    let store = StoreUrl::parse(url).unwrap().open().unwrap();
    let start_rss = reset_peak();
    let (stream, digest) = generated();
    let (put_s, get_s) = block_on(async {
        let t = Instant::now();
        let n = store.put_nar("nar/big.nar", stream).await.unwrap();
        assert_eq!(n, SIZE);
        let put_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let mut blob = store.nar("nar/big.nar", None).await.unwrap();
        assert_eq!(blob.total, SIZE);
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        while let Some(chunk) = blob.stream.next().await {
            let chunk = chunk.unwrap();
            got += chunk.len() as u64;
            hasher.update(&chunk);
        }
        assert_eq!(got, SIZE, "{url}: bytes read back");
        let want = digest
            .lock()
            .unwrap()
            .clone()
            .expect("the source ran to its end");
        assert!(hasher.finalize().to_vec() == want, "{url}: SHA-256 differs");
        (put_s, t.elapsed().as_secs_f64())
    });
    let peak = status_kib("VmHWM:");
    (peak.saturating_sub(start_rss), put_s, get_s)
}

#[test]
fn one_gib_through_s3_and_gcs_in_bounded_memory() {
    let s3_ep = peer("NIXCACHED_TEST_S3_ENDPOINT");
    let gcs_ep = peer("NIXCACHED_TEST_GCS_ENDPOINT");
    let bucket = format!("big-{}", std::process::id());
    let (code, _) = common::curl(&["-X", "PUT", &format!("{s3_ep}/{bucket}")]);
    assert_eq!(code, 200, "creating the S3 bucket");
    let (code, _) = common::curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        &format!(r#"{{"name":"{bucket}"}}"#),
        &format!("{gcs_ep}/storage/v1/b?project=test"),
    ]);
    assert_eq!(code, 200, "creating the GCS bucket");

    let mut failures = Vec::new();
    for (url, delete) in [
        (
            format!("s3://{bucket}?endpoint={s3_ep}"),
            format!("{s3_ep}/{bucket}/nar/big.nar"),
        ),
        (
            format!("gs://{bucket}?endpoint={gcs_ep}"),
            format!("{gcs_ep}/storage/v1/b/{bucket}/o/nar%2Fbig.nar"),
        ),
    ] {
        let (growth, put_s, get_s) = round_trip(&url);
        if url.starts_with("s3://") {
            // A multipart object's ETag ends in its part count: 1 GiB in 8 MiB parts.
            let (_, headers) = common::curl_headers(&[&delete]);
            let etag = headers
                .iter()
                .find(|(k, _)| k == "etag")
                .map(|(_, v)| v.trim_matches('"').to_owned());
            if etag.as_deref().is_none_or(|e| !e.ends_with("-128")) {
                failures.push(format!("{url}: ETag {etag:?}, not a 128-part upload"));
            }
        }
        // Both emulators keep objects in memory for the rest of the scripts/test run.
        common::curl(&["-X", "DELETE", &delete]);
        eprintln!(
            "{url}: 1 GiB put in {put_s:.1} s, get+hash in {get_s:.1} s; peak RSS grew by {} KiB ({:.1} MiB)",
            growth,
            growth as f64 / 1024.0
        );
        if growth > BUDGET_KIB {
            failures.push(format!("{url}: peak RSS grew by {growth} KiB"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
