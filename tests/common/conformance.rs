//! The conformance suite every store backend must pass, written once.
//!
//! Each backend gets the same closure (three paths with references, built by the real Nix)
//! and must answer the same questions the same way: narinfos, NAR bytes, ranges, listings,
//! logs, listing of objects, refusals of malformed or escaping requests, and writes (or a
//! clear refusal).
#![allow(dead_code)]

use std::sync::Arc;

use futures::stream;
use nixcached_actors::formats::{nar, Digest, NarInfo, StoreDir};
use nixcached_actors::store::{ByteRange, ByteStream, Store, StoreError};
use tokio::io::AsyncReadExt;

use super::{Closure, NixEnv};

/// What every backend is expected to hold.
pub struct Fixture {
    pub closure: Closure,
    /// (digest, NAR bytes, reference base names sorted, listing JSON)
    pub objects: Vec<(Digest, Vec<u8>, Vec<String>, String)>,
}

/// Builds the closure in `env`'s chroot store and records what every backend must return.
pub fn fixture(env: &NixEnv) -> Fixture {
    let closure = env.build_closure();
    let objects = closure
        .paths
        .iter()
        .map(|p| {
            let mut bytes = Vec::new();
            nar::dump(&env.real(p), &mut bytes).unwrap();
            let mut refs: Vec<String> = env
                .run(
                    "nix-store",
                    &["--store", &env.store_arg(), "-q", "--references", p],
                )
                .lines()
                .map(|l| l.trim_start_matches("/nix/store/").to_owned())
                .collect();
            refs.sort();
            let listing = nar::listing(&env.real(p)).unwrap().to_json();
            (
                Digest::parse(&p["/nix/store/".len()..][..32]).unwrap(),
                bytes,
                refs,
                listing,
            )
        })
        .collect();
    Fixture { closure, objects }
}

pub fn bytes_stream(b: &'static [u8]) -> ByteStream {
    Box::pin(stream::once(
        async move { Ok(bytes::Bytes::from_static(b)) },
    ))
}

async fn read_all(store: &dyn Store, url: &str, range: Option<ByteRange>) -> Vec<u8> {
    store
        .nar(url, range)
        .await
        .unwrap()
        .into_bytes()
        .await
        .unwrap()
}

/// Runs every check against `store`, which must already hold `fx`'s closure.
pub async fn suite(store: Arc<dyn Store>, fx: &Fixture, writable: bool) {
    let name = store.describe();
    let info = store.cache_info().await.unwrap();
    assert_eq!(info.store_dir, StoreDir::default(), "{name}");

    let listed = store.list().await.unwrap();
    for (digest, nar_bytes, refs, listing) in &fx.objects {
        assert!(listed.contains(digest), "{name}: list() lacks {digest}");
        let ni = store.narinfo(digest).await.unwrap();
        assert_eq!(*ni.store_path.digest(), *digest, "{name}");
        assert_eq!(ni.nar_size, nar_bytes.len() as u64, "{name}");
        assert_eq!(
            ni.nar_hash.to_nix32(),
            super::nix32_sha256(nar_bytes),
            "{name}"
        );
        let mut got_refs: Vec<String> = ni.references.iter().map(|r| r.to_string()).collect();
        got_refs.sort();
        assert_eq!(&got_refs, refs, "{name}: references of {digest}");

        // The file the narinfo names decompresses to the NAR.
        let file = read_all(&*store, &ni.url, None).await;
        if let Some(size) = ni.file_size {
            assert_eq!(file.len() as u64, size, "{name}: FileSize");
        }
        let mut back = Vec::new();
        ni.compression
            .decoder(&file[..])
            .read_to_end(&mut back)
            .await
            .unwrap();
        assert!(&back == nar_bytes, "{name}: NAR of {digest}");

        // Ranges are exact slices of the stored file.
        let len = file.len() as u64;
        for (start, end) in [(0, 1), (1, len / 2), (len / 3, len), (len - 1, len)] {
            let blob = store
                .nar(&ni.url, Some(ByteRange::span(start, Some(end))))
                .await
                .unwrap();
            assert_eq!(blob.span, (start, end), "{name}");
            assert_eq!(blob.total, len, "{name}");
            let part = blob.into_bytes().await.unwrap();
            assert!(
                part == file[start as usize..end as usize],
                "{name}: range {start}-{end}"
            );
        }
        let open_ended = read_all(&*store, &ni.url, Some(ByteRange::span(5, None))).await;
        assert!(open_ended == file[5..], "{name}: open-ended range");
        assert!(
            matches!(
                store.nar(&ni.url, Some(ByteRange::span(len + 10, None))).await,
                Err(StoreError::RangeNotSatisfiable { total }) if total == len
            ),
            "{name}: range past the end"
        );
        let tail = read_all(&*store, &ni.url, Some(ByteRange::Last(7))).await;
        assert!(tail == file[file.len() - 7..], "{name}: suffix range");

        assert_eq!(
            &store.listing(digest).await.unwrap(),
            listing,
            "{name}: listing of {digest}"
        );
        assert!(store.exists(&ni.url).await.unwrap(), "{name}");
        assert!(
            store.exists(&format!("{digest}.narinfo")).await.unwrap(),
            "{name}"
        );
    }

    // Missing and malformed requests.
    let missing = Digest::parse("00000000000000000000000000000000").unwrap();
    assert!(
        store.narinfo(&missing).await.unwrap_err().is_not_found(),
        "{name}"
    );
    assert!(
        !store.exists(&format!("{missing}.narinfo")).await.unwrap(),
        "{name}"
    );
    // Malformed digests cannot reach a store: they do not parse into a `Digest`.
    for bad in ["../../etc/passwd", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"] {
        assert!(
            Digest::parse(bad).is_err(),
            "{bad} must not parse as a digest"
        );
    }
    for bad in [
        "../nix-cache-info",
        "/etc/passwd",
        "nar/../../../etc/passwd",
        "nar/%2e%2e/x",
        "nar//x",
    ] {
        let r = store.nar(bad, None).await;
        assert!(
            matches!(
                r,
                Err(StoreError::Invalid(_)) | Err(StoreError::NotFound(_))
            ),
            "{name}: {bad} must be refused, got {r:?}"
        );
    }
    assert!(
        store
            .nar(&format!("nar/{missing}.nar"), None)
            .await
            .unwrap_err()
            .is_not_found(),
        "{name}"
    );

    // Writes: either they work and read back, or the store says it is read-only.
    let (digest, nar_bytes, _, listing) = &fx.objects[0];
    let mut ni: NarInfo = store.narinfo(digest).await.unwrap();
    let put = store
        .put_nar("nar/conformance.nar", bytes_stream(b"conformance"))
        .await;
    if writable {
        assert_eq!(put.unwrap(), 11);
        assert_eq!(
            read_all(&*store, "nar/conformance.nar", None).await,
            b"conformance"
        );
        ni.extra.push(("Conformance".into(), "yes".into()));
        store.put_narinfo(&ni).await.unwrap();
        assert_eq!(
            store.narinfo(digest).await.unwrap(),
            ni,
            "{name}: narinfo round trip"
        );
        store.put_listing(digest, listing).await.unwrap();
        assert_eq!(&store.listing(digest).await.unwrap(), listing);
        let drv = "00000000000000000000000000000000-x.drv";
        store
            .put_log(drv, bytes_stream(b"build log\n"))
            .await
            .unwrap();
        assert_eq!(
            store.log(drv).await.unwrap().into_bytes().await.unwrap(),
            b"build log\n"
        );
        assert!(
            store
                .put_nar("../escape", bytes_stream(b"x"))
                .await
                .is_err(),
            "{name}"
        );
        let _ = nar_bytes;
    } else {
        assert!(
            matches!(put, Err(StoreError::Unsupported(_))),
            "{name}: {put:?}"
        );
        assert!(matches!(
            store.put_narinfo(&ni).await,
            Err(StoreError::Unsupported(_))
        ));
    }
}
