//! The conformance suite (tests/common/conformance.rs) against the local Nix store and
//! file:// caches; remote backends run the same suite in their own test files.

mod common;

use std::sync::Arc;

use common::conformance::{bytes_stream, fixture, suite};
use common::{block_on, NixEnv};
use nixcached_actors::formats::{Compression, Digest, StoreDir};
use nixcached_actors::publish::{publish, PublishOptions};
use nixcached_actors::store::binary_cache::BinaryCache;
use nixcached_actors::store::file::FileBlobs;
use nixcached_actors::store::local::{LocalStore, LocalStoreLayout};
use nixcached_actors::store::{Store, StoreError};

#[test]
fn local_nix_store() {
    let env = NixEnv::new();
    let fx = fixture(&env);
    let store: Arc<dyn Store> =
        Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    block_on(async {
        suite(store.clone(), &fx, false).await;
        // Build logs come from Nix's log directory.
        let drv = env.deriver_of(&fx.closure.lib);
        let log = store.log(&drv).await.unwrap().into_bytes().await.unwrap();
        assert!(
            String::from_utf8_lossy(&log).contains("building testlib"),
            "{}",
            String::from_utf8_lossy(&log)
        );
        // Derivations are valid paths and are served too, as the original does.
        let drv_digest = Digest::parse(&drv[..32]).unwrap();
        let info = store.narinfo(&drv_digest).await.unwrap();
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
        let ghost_digest = Digest::parse(ghost).unwrap();
        assert!(store
            .narinfo(&ghost_digest)
            .await
            .unwrap_err()
            .is_not_found());
        assert!(store
            .nar(&format!("nar/{ghost}.nar"), None)
            .await
            .unwrap_err()
            .is_not_found());
        assert!(!store.list().await.unwrap().contains(&ghost_digest));
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

/// Listing with sizes and times, and deleting objects, on every kind of bucket: the object is gone for `head`, `get` and
/// `list`; deleting what is not there is not an error; other objects stay; keys that escape
/// the cache are refused.
#[test]
fn list_meta_and_delete_on_a_folder_an_s3_and_a_gcs_bucket() {
    use nixcached_actors::store::url::StoreUrl;
    let env = NixEnv::new();
    let (s3_ep, s3) = common::peers::new_s3_bucket("delete");
    let (gcs_ep, gcs) = common::peers::new_gcs_bucket("delete");
    let urls = [
        format!("file://{}?create_dir=1", env.path("delete").display()),
        format!("s3://{s3}?endpoint={s3_ep}&region=us-east-1"),
        format!("gs://{gcs}?endpoint={gcs_ep}"),
    ];
    for url in urls {
        let blobs = StoreUrl::parse(&url).unwrap().open_blobs().unwrap();
        block_on(async {
            for key in ["nar/a.nar", "nar/b.nar", "x.narinfo"] {
                blobs
                    .put(key, bytes_stream(b"contents"), "application/octet-stream")
                    .await
                    .unwrap();
            }
            // Listings carry each object's size and a time of writing close to now.
            let mut listed = blobs.list_meta("nar/").await.unwrap();
            listed.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(
                listed
                    .iter()
                    .map(|m| (m.key.as_str(), m.size))
                    .collect::<Vec<_>>(),
                [("nar/a.nar", 8), ("nar/b.nar", 8)],
                "{url}"
            );
            for m in &listed {
                let written = m
                    .modified
                    .unwrap_or_else(|| panic!("{url}: no time for {}", m.key));
                let age = std::time::SystemTime::now()
                    .duration_since(written)
                    .unwrap_or_default();
                assert!(age < std::time::Duration::from_secs(300), "{url}: {m:?}");
            }
            blobs.delete("nar/a.nar").await.unwrap();
            assert_eq!(blobs.head("nar/a.nar").await.unwrap(), None, "{url}");
            assert!(
                matches!(
                    blobs.get("nar/a.nar", None).await,
                    Err(StoreError::NotFound(_))
                ),
                "{url}"
            );
            assert_eq!(blobs.list("nar/").await.unwrap(), ["nar/b.nar"], "{url}");
            assert_eq!(blobs.head("x.narinfo").await.unwrap(), Some(8), "{url}");
            blobs.delete("nar/a.nar").await.unwrap();
            blobs.delete("never-was").await.unwrap();
            for bad in ["../escape", "/abs", "nar/../../x"] {
                assert!(blobs.delete(bad).await.is_err(), "{url}: {bad}");
            }
        });
    }
}
