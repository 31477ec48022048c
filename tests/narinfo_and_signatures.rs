//! Narinfos, signatures and compressions against the real Nix, in both directions.

mod common;

use std::fs;
use std::sync::Arc;

use common::{block_on, NixEnv};
use nixcached_actors::formats::{nar, Compression, Digest, NarInfo, PublicKey};
use nixcached_actors::publish::{publish, PublishOptions};
use nixcached_actors::store::binary_cache::BinaryCache;
use nixcached_actors::store::file::FileBlobs;
use nixcached_actors::store::local::{LocalStore, LocalStoreLayout};
use nixcached_actors::store::Store;
use tokio::io::AsyncReadExt;

fn digest_of(path: &str) -> Digest {
    Digest::parse(&path["/nix/store/".len()..][..32]).unwrap()
}

/// Nix writes caches in every compression; we parse and re-render each narinfo byte for byte,
/// decompress each NAR to exactly what `nix-store --dump` gives, and verify Nix's signatures.
#[test]
fn narinfos_written_by_nix_copy_round_trip_and_verify() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("nix-made-1");
    let pk = PublicKey::parse(&pk).unwrap();
    for comp in ["zstd", "xz", "none", "bzip2", "br", "gzip"] {
        let cache = env.path(&format!("cache-{comp}"));
        env.copy_to(
            &format!(
                "file://{}?compression={comp}&secret-key={}&write-nar-listing=true",
                cache.display(),
                sk.display()
            ),
            &[&closure.app],
        );
        for path in &closure.paths {
            let d = digest_of(path);
            let text = fs::read_to_string(cache.join(format!("{d}.narinfo"))).unwrap();
            let info = NarInfo::parse(&text).unwrap();
            assert_eq!(info.render(), text, "{comp}: render must equal Nix's bytes");
            assert_eq!(info.compression, comp.parse::<Compression>().unwrap());
            assert_eq!(
                info.verified_by(std::slice::from_ref(&pk)).len(),
                1,
                "Nix's signature verifies here"
            );

            let mut expected = Vec::new();
            nar::dump(&env.real(path), &mut expected).unwrap();
            assert_eq!(info.nar_size, expected.len() as u64);
            assert_eq!(info.nar_hash.to_nix32(), common::nix32_sha256(&expected));

            let file = fs::read(cache.join(&info.url)).unwrap();
            assert_eq!(
                info.file_hash.as_ref().unwrap().to_nix32(),
                common::nix32_sha256(&file)
            );
            let mut back = Vec::new();
            block_on(info.compression.decoder(&file[..]).read_to_end(&mut back)).unwrap();
            assert!(back == expected, "{comp}: our decoder gives the NAR back");

            let ls = fs::read_to_string(cache.join(format!("{d}.ls"))).unwrap();
            assert_eq!(nar::listing(&env.real(path)).unwrap().to_json(), ls);
        }
    }
}

/// We write a cache in every compression and sign with a key Nix generated; the real Nix
/// verifies it and copies from it, and rejects it under a key it does not trust.
#[test]
fn caches_we_write_are_accepted_by_nix() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk_file, pk) = env.keypair("ours-1");
    let key = nixcached_actors::formats::SecretKey::parse(&fs::read_to_string(&sk_file).unwrap())
        .unwrap();
    let local: Arc<dyn Store> =
        Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    for comp in Compression::ALL {
        let dir = env.path(&format!("ours-{comp}"));
        let cache = BinaryCache::new(Arc::new(FileBlobs::open(&dir, true).unwrap()));
        let opts = PublishOptions {
            compression: comp,
            keys: vec![key.clone()],
            ..PublishOptions::default()
        };
        block_on(async {
            cache
                .ensure_cache_info(&nixcached_actors::formats::StoreDir::default())
                .await
                .unwrap();
            for path in &closure.paths {
                publish(&*local, &cache, &digest_of(path), &opts)
                    .await
                    .unwrap();
            }
        });
        let url = format!("file://{}", dir.display());
        env.verify(&url, Some(&*pk), &closure.app);
        let fresh = env.path(&format!("fresh-{comp}"));
        env.copy_from(&url, fresh.to_str().unwrap(), Some(&*pk), &closure.app);
        // What Nix unpacked is the same tree.
        let mut a = Vec::new();
        let mut b = Vec::new();
        nar::dump(&env.real(&closure.app), &mut a).unwrap();
        nar::dump(&fresh.join(closure.app.trim_start_matches('/')), &mut b).unwrap();
        assert!(a == b, "{comp}: Nix unpacked what we packed");
        let listing =
            fs::read_to_string(dir.join(format!("{}.ls", digest_of(&closure.app)))).unwrap();
        assert_eq!(
            listing,
            nar::listing(&env.real(&closure.app)).unwrap().to_json()
        );
    }

    // The same cache under an untrusted key is refused: the check above can fail.
    let (_, other_pk) = env.keypair("other-1");
    let url = format!("file://{}", env.path("ours-zstd").display());
    let out = env.output(
        "nix",
        &[
            "copy",
            "--from",
            &url,
            "--to",
            env.path("refused").to_str().unwrap(),
            "--trusted-public-keys",
            &other_pk,
            &closure.app,
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Signatures Nix puts into its own database (`nix store sign`) verify here, and the
/// fingerprint we compute matches the one Nix signed.
#[test]
fn signatures_from_nix_store_sign_verify_here() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("db-1");
    env.sign_closure(&sk, &closure.app);
    let local = Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    let pk = PublicKey::parse(&pk).unwrap();
    block_on(async {
        for path in &closure.paths {
            let info = local.narinfo(&digest_of(path)).await.unwrap();
            assert_eq!(info.sigs.len(), 1, "{path}");
            assert_eq!(
                info.verified_by(std::slice::from_ref(&pk)).len(),
                1,
                "{path}"
            );
        }
    });
}
