//! One conformance suite, run against every store backend with content made by the real Nix.
//!
//! Each backend gets the same closure (three paths with references) and must answer the
//! same questions the same way: narinfos, NAR bytes, ranges, listings, logs, listing of
//! objects, refusals of malformed or escaping requests, and writes (or a clear refusal).

mod common;

use std::sync::Arc;

use common::{block_on, Closure, NixEnv};
use futures::stream;
use nixcached_actors::formats::{nar, Compression, NarInfo, StoreDir};
use nixcached_actors::publish::{publish, PublishOptions};
use nixcached_actors::store::binary_cache::BinaryCache;
use nixcached_actors::store::file::FileBlobs;
use nixcached_actors::store::local::{LocalStore, LocalStoreLayout};
use nixcached_actors::store::{ByteRange, ByteStream, Store, StoreError};
use tokio::io::AsyncReadExt;

/// What every backend is expected to hold.
struct Fixture {
    closure: Closure,
    /// (digest, NAR bytes, reference base names sorted, listing JSON)
    objects: Vec<(String, Vec<u8>, Vec<String>, String)>,
}

fn fixture(env: &NixEnv) -> Fixture {
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
                p["/nix/store/".len()..][..32].to_owned(),
                bytes,
                refs,
                listing,
            )
        })
        .collect();
    Fixture { closure, objects }
}

fn bytes_stream(b: &'static [u8]) -> ByteStream {
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

async fn suite(store: Arc<dyn Store>, fx: &Fixture, writable: bool) {
    let name = store.describe();
    let info = store.cache_info().await.unwrap();
    assert_eq!(info.store_dir, StoreDir::default(), "{name}");

    let listed = store.list().await.unwrap();
    for (digest, nar_bytes, refs, listing) in &fx.objects {
        assert!(listed.contains(digest), "{name}: list() lacks {digest}");
        let ni = store.narinfo(digest).await.unwrap();
        assert_eq!(ni.store_path.digest(), digest, "{name}");
        assert_eq!(ni.nar_size, nar_bytes.len() as u64, "{name}");
        assert_eq!(
            ni.nar_hash.to_nix32(),
            common::nix32_sha256(nar_bytes),
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
    let missing = "00000000000000000000000000000000";
    assert!(
        store.narinfo(missing).await.unwrap_err().is_not_found(),
        "{name}"
    );
    assert!(
        !store.exists(&format!("{missing}.narinfo")).await.unwrap(),
        "{name}"
    );
    assert!(
        matches!(
            store.narinfo("../../etc/passwd").await,
            Err(StoreError::Invalid(_))
        ),
        "{name}"
    );
    assert!(
        matches!(
            store.narinfo("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee").await,
            Err(StoreError::Invalid(_))
        ),
        "{name}"
    );
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

#[test]
fn local_nix_store() {
    let env = NixEnv::new();
    let fx = fixture(&env);
    let store: Arc<dyn Store> =
        Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    block_on(async {
        suite(store.clone(), &fx, false).await;
        // Build logs come from Nix's log directory.
        let drv = env
            .run(
                "nix-store",
                &[
                    "--store",
                    &env.store_arg(),
                    "-q",
                    "--deriver",
                    &fx.closure.lib,
                ],
            )
            .trim()
            .trim_start_matches("/nix/store/")
            .to_owned();
        let log = store.log(&drv).await.unwrap().into_bytes().await.unwrap();
        assert!(
            String::from_utf8_lossy(&log).contains("building testlib"),
            "{}",
            String::from_utf8_lossy(&log)
        );
        // Derivations are valid paths and are served too, as the original does.
        let drv_digest = &drv[..32];
        let info = store.narinfo(drv_digest).await.unwrap();
        assert!(info.store_path.is_derivation());
    });
}

#[test]
fn local_store_never_serves_lock_files_or_invalid_paths() {
    let env = NixEnv::new();
    let fx = fixture(&env);
    let real = env.store_root().join("nix/store");
    // A stray object Nix does not know (as left by an interrupted build) and a lock file.
    let ghost = "0123456789abcdfghijklmnpqrsvwxyz";
    std::fs::create_dir_all(real.join(format!("{ghost}-ghost"))).unwrap();
    std::fs::write(real.join(format!("{ghost}-ghost.lock")), "").unwrap();
    let store: Arc<dyn Store> =
        Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    block_on(async {
        assert!(store.narinfo(ghost).await.unwrap_err().is_not_found());
        assert!(store
            .nar(&format!("nar/{ghost}.nar"), None)
            .await
            .unwrap_err()
            .is_not_found());
        assert!(!store.list().await.unwrap().contains(&ghost.to_owned()));
        assert_eq!(
            store.list().await.unwrap().len(),
            fx.objects.len() + 3,
            "closure + busybox + 2 drvs"
        );
    });
}

#[test]
fn file_cache_written_by_nix() {
    let env = NixEnv::new();
    let fx = fixture(&env);
    for comp in ["zstd", "xz", "none"] {
        let dir = env.path(&format!("nixcache-{comp}"));
        env.copy_to(
            &format!(
                "file://{}?compression={comp}&write-nar-listing=true",
                dir.display()
            ),
            &[&fx.closure.app],
        );
        let store: Arc<dyn Store> = Arc::new(BinaryCache::new(Arc::new(
            FileBlobs::open(&dir, false).unwrap(),
        )));
        block_on(suite(store, &fx, true));
    }
}

#[test]
fn file_cache_written_by_us() {
    let env = NixEnv::new();
    let fx = fixture(&env);
    let local: Arc<dyn Store> =
        Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    let dir = env.path("ourcache");
    let cache = BinaryCache::new(Arc::new(FileBlobs::open(&dir, true).unwrap()));
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
}

#[test]
fn file_cache_refuses_symlinks_out_of_the_folder() {
    let env = NixEnv::new();
    let dir = env.path("trap");
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(env.path("secret"), "secret").unwrap();
    std::os::unix::fs::symlink(env.path("secret"), dir.join("nar/evil.nar")).unwrap();
    std::os::unix::fs::symlink(env.dir.path(), dir.join("up")).unwrap();
    let store = BinaryCache::new(Arc::new(FileBlobs::open(&dir, false).unwrap()));
    block_on(async {
        assert!(matches!(
            store.nar("nar/evil.nar", None).await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.nar("up/secret", None).await,
            Err(StoreError::Invalid(_))
        ));
        assert!(store
            .put_nar("up/planted", bytes_stream(b"x"))
            .await
            .is_err());
    });
    assert!(!env.path("planted").exists());
}
