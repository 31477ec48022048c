//! `nix copy --to http://…` into a served cache (`serve --allow-push`): the real Nix pushes a
//! closure into file://, s3:// (moto), gs:// (fake-gcs-server) and ssh:// caches, and a fresh
//! Nix substitutes it back with signatures checked; hostile pushes by curl and by a raw socket
//! are refused with a 4xx and leave nothing stored.

#[path = "../common/mod.rs"]
mod common;

mod bed;
mod hostile;
mod limits;

use std::path::Path;

use common::peers::{gcs_bucket, s3_bucket, ssh_url};
use common::{curl, Closure, Daemon, NixEnv};

use bed::Bed;

/// The 32-character digest of a store path.
pub fn digest(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

/// `nixcached serve --allow-push` with the environment's write credential, `--secret-key-file
/// SK`, a negative cache of an hour (so a push must invalidate it), and `extra` flags.
pub fn serve_pushable(env: &NixEnv, store: &str, sk: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["--negative-ttl", "1h"];
    args.extend_from_slice(extra);
    common::credentials::serve_pushable(env, store, sk, &args)
}

/// The file:// URL of a cache folder, created empty.
pub fn file_url(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    format!("file://{}", dir.display())
}

/// Pushes the closure with the real `nix copy` into the cache served at `store`, then has a
/// fresh Nix environment copy and substitute it from the server, checking the server's
/// signature.
fn push_then_substitute(store: &str, copy_options: &str) -> (NixEnv, Closure, Daemon) {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("push-1");
    let d = serve_pushable(&env, store, &sk, &[]);
    env.copy_to(&format!("{}{copy_options}", d.url), &[&closure.app]);
    let fresh = NixEnv::new();
    fresh.substitute_from(&d.url, &closure.app, &pk, "pushed");
    for p in &closure.paths {
        let (code, body) = curl(&[&format!("{}/{}.narinfo", d.url, digest(p))]);
        assert_eq!(code, 200, "{p}");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("Sig: push-1:"), "{text}");
    }
    assert!(d.logged(&format!("pushed {}", closure.app)));
    // The signature is in the store, not added when served: a server without the key
    // serves it too.
    let plain = Daemon::start(&env, &["serve", store]);
    let (code, body) = curl(&[&format!("{}/{}.narinfo", plain.url, digest(&closure.app))]);
    assert_eq!(code, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("Sig: push-1:"), "{text}");
    (env, closure, d)
}

#[test]
fn nix_copy_pushes_into_a_file_cache_and_a_fresh_nix_substitutes_it() {
    let cache = tempfile::tempdir().unwrap();
    let store = format!("file://{}", cache.path().display());
    let (_env, closure, _d) = push_then_substitute(&store, "?write-nar-listing=1");
    // Stored as Nix wrote it, plus the server's signature, which it adds because it checked
    // the NAR: the stored narinfo carries it, not only the served one.
    let stored = std::fs::read_to_string(
        cache
            .path()
            .join(format!("{}.narinfo", digest(&closure.app))),
    )
    .unwrap();
    assert!(stored.contains("Sig: push-1:"), "{stored}");
    assert!(stored.contains("Compression: xz"), "{stored}");
    assert!(cache
        .path()
        .join(format!("{}.ls", digest(&closure.app)))
        .is_file());
}

#[test]
fn nix_copy_pushes_into_s3() {
    push_then_substitute(&s3_bucket("push"), "?compression=zstd");
}

#[test]
fn nix_copy_pushes_into_gcs() {
    push_then_substitute(&gcs_bucket("push"), "");
}

#[test]
fn nix_copy_pushes_into_a_remote_nix_store_over_ssh() {
    let remote = tempfile::tempdir().unwrap();
    let root = remote.path().join("store");
    let (env, closure, _d) = push_then_substitute(&ssh_url(&root), "");
    // Imported by the remote Nix, which checked the NAR hashes once more.
    for p in &closure.paths {
        env.run(
            "nix-store",
            &["--store", root.to_str().unwrap(), "--verify-path", p],
        );
    }
}

#[test]
fn a_remembered_miss_is_forgotten_when_the_narinfo_is_pushed() {
    let b = Bed::new("cache", |_| Vec::new());
    let key = format!("{}.narinfo", digest(&b.closure.app));
    assert_eq!(b.get(&key), 404);
    // Remembered as a miss for an hour (--negative-ttl 1h) unless the push says otherwise.
    assert_eq!(b.get(&key), 404);
    b.env.copy_to(&b.d.url, &[&b.closure.app]);
    assert_eq!(b.get(&key), 200);
    assert_eq!(curl(&["-I", &format!("{}/{key}", b.d.url)]).0, 200);
}
