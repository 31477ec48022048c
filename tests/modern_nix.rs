//! Both real Nix clients against `nixcached`: Debian 12's Nix 2.8 and Debian 13's Nix 2.26
//! (in the trixie root scripts/test builds). 2.26 asks for `Content-Encoding: zstd`, sends
//! three HEADs per narinfo, and writes `.ls` listings with sorted keys; everything here must
//! work the same for either, and a cache one writes must serve the other.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::modern::{Client, BOTH};
use common::upload::{mkfifo, Upload};
use common::{curl, Daemon, NixEnv};

fn digest(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

/// Field names of a narinfo, in order.
fn fields(narinfo: &str) -> Vec<String> {
    narinfo
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_owned()))
        .collect()
}

/// Substitutes `path` from `url` into fresh stores of `env`, signatures checked, then checks
/// the served cache itself with `nix store verify`: with `pk` it passes, with `wrong_pk` the
/// built (signed, not content-addressed) paths are untrusted.
fn substitute_and_verify(env: &NixEnv, url: &str, path: &str, pk: &str, wrong_pk: &str, tag: &str) {
    env.substitute_from(url, path, pk, tag);
    let sub = env.path(&format!("sub-{tag}"));
    assert!(
        sub.join(path.trim_start_matches('/'))
            .join("bin/hi")
            .exists(),
        "{:?}: {path} was not substituted into {}",
        env.client,
        sub.display()
    );
    env.verify(url, Some(pk), path);
    let out = env.output(
        "nix",
        &[
            "store",
            "verify",
            "--store",
            url,
            "--trusted-public-keys",
            wrong_pk,
            "-r",
            path,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("untrusted"),
        "{:?}: nix store verify of {url} with a wrong key: {}\n{stderr}",
        env.client,
        out.status
    );
}

#[test]
fn both_clients_substitute_and_verify_from_serve_over_a_folder_and_the_local_store() {
    let src = NixEnv::new();
    let closure = src.build_closure();
    let (sk, pk) = src.keypair("modern-1");
    let (_, wrong_pk) = src.keypair("modern-wrong");
    let folder = src.path("folder");
    src.copy_to(
        &format!(
            "file://{}?compression=zstd&secret-key={}",
            folder.display(),
            sk.display()
        ),
        &[&closure.app],
    );
    let over_folder = Daemon::start(&src, &["serve", &format!("file://{}", folder.display())]);
    let over_store = Daemon::start(
        &src,
        &[
            "serve",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &src.store_arg(),
        ],
    );
    for client in BOTH {
        for (tag, d) in [("folder", &over_folder), ("store", &over_store)] {
            // A fresh client: own stores, own narinfo cache.
            let env = NixEnv::with_client(client);
            substitute_and_verify(&env, &d.url, &closure.app, &pk, &wrong_pk, tag);
        }
    }
}

#[test]
fn transparent_zstd_goes_to_nix_226_and_identity_to_nix_28() {
    let src = NixEnv::new();
    let closure = src.build_closure();
    let (sk, pk) = src.keypair("modern-zstd-1");
    for client in BOTH {
        // A server per client, so its count is that client's alone. The local store serves
        // uncompressed NARs, which is what the option encodes.
        let d = Daemon::start(
            &src,
            &[
                "serve",
                "--transparent-zstd",
                "--secret-key-file",
                sk.to_str().unwrap(),
                &src.store_arg(),
            ],
        );
        let env = NixEnv::with_client(client);
        env.substitute_from(&d.url, &closure.app, &pk, "zstd");
        let served = d.metric("nixcached_backend_nar_opens_total");
        let encoded = d.metric("nixcached_nar_zstd_encoded_total");
        eprintln!("{client:?}: {encoded} of {served} NAR responses zstd-encoded");
        match client {
            // 2.8 sends no Accept-Encoding at all.
            Client::Nix28 => assert_eq!(encoded, 0, "Nix 2.8 never asks for zstd"),
            // copy and realise each fetch the three NARs of the closure.
            Client::Nix226 => assert!(
                encoded >= closure.paths.len() as u64 && encoded == served,
                "Nix 2.26 asks for zstd on every NAR: {encoded} of {served} encoded"
            ),
        }
    }
}

#[test]
fn post_build_hook_in_each_client_feeds_upload_and_the_other_client_substitutes_from_it_and_the_store(
) {
    for (builder, other) in [
        (Client::Nix28, Client::Nix226),
        (Client::Nix226, Client::Nix28),
    ] {
        let env = NixEnv::with_client(builder);
        let (sk, pk) = env.keypair("modern-hook-1");
        // The uploader opens the builder's store database at start, so it must exist.
        let seed = env.path("seed");
        std::fs::create_dir_all(&seed).unwrap();
        std::fs::write(seed.join("x"), "seed").unwrap();
        env.add(&seed);

        let folder = env.path("folder");
        let fifo = env.path("hook.fifo");
        mkfifo(&fifo);
        let up = Upload::start(
            &env,
            &fifo,
            &format!("file://{}", folder.display()),
            &[
                "--allow-finish",
                "--compression",
                "zstd",
                "--secret-key-file",
                sk.to_str().unwrap(),
            ],
        );
        // The hook runs where the builder's Nix runs (chrooted for 2.26, with the host's
        // binary bind-mounted); the FIFO is in the test folder, seen at one path by both.
        // 2.8 leaves OUT_PATHS empty for a chroot store, so the hook asks for the outputs.
        let hook = env.path("hook.sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\nset -eu\nOUT=\"${{OUT_PATHS:-$(nix-store --store {} -q --outputs \"$DRV_PATH\")}}\"\n\
                 echo \"OUT_PATHS=[$OUT_PATHS]\" >> {}\nexec {} send -o {} --timeout 60s $OUT\n",
                env.store_arg(),
                env.path("hook.log").display(),
                env.nixcached(),
                fifo.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        env.set_nix_config(Some(format!("post-build-hook = {}", hook.display())));
        let closure = env.build_closure();
        env.set_nix_config(None);
        eprintln!(
            "{builder:?}'s hook ran with: {}",
            std::fs::read_to_string(env.path("hook.log")).unwrap_or_default()
        );
        let out = Command::new(env!("CARGO_BIN_EXE_nixcached"))
            .args(["send", "-o", fifo.to_str().unwrap(), "--finish"])
            .output()
            .unwrap();
        common::assert_succeeded(&out);
        let log = up.log.clone();
        let status = up.wait();
        assert!(
            status.success(),
            "upload fed by {builder:?}'s hook: {status}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        for p in [&closure.app, &closure.lib] {
            assert!(
                folder.join(format!("{}.narinfo", digest(p))).is_file(),
                "{builder:?}'s hook did not get {p} uploaded"
            );
        }

        let d = Daemon::start(&env, &["serve", &format!("file://{}", folder.display())]);
        let reader = NixEnv::with_client(other);
        let (_, wrong_pk) = reader.keypair("modern-hook-wrong");
        substitute_and_verify(&reader, &d.url, &closure.app, &pk, &wrong_pk, "hook");

        // The builder's store itself, served (its database written by that client's Nix).
        let d = Daemon::start(
            &env,
            &[
                "serve",
                "--secret-key-file",
                sk.to_str().unwrap(),
                &env.store_arg(),
            ],
        );
        substitute_and_verify(&reader, &d.url, &closure.app, &pk, &wrong_pk, "store");
    }
}

/// Reads every narinfo of a folder cache: digest → text.
fn narinfos(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_cache_nix_226_writes_is_served_to_nix_28() {
    let modern = NixEnv::with_client(Client::Nix226);
    let closure = modern.build_closure();
    let (sk, pk) = modern.keypair("modern-copy-1");
    let (_, wrong_pk) = modern.keypair("modern-copy-wrong");
    for comp in ["zstd", "xz", "none"] {
        let dir = modern.path(&format!("cache-{comp}"));
        modern.copy_to(
            &format!(
                "file://{}?compression={comp}&secret-key={}&write-nar-listing=true",
                dir.display(),
                sk.display()
            ),
            &[&closure.app],
        );
        let d = Daemon::start(&modern, &["serve", &format!("file://{}", dir.display())]);
        let old = NixEnv::new();
        substitute_and_verify(&old, &d.url, &closure.app, &pk, &wrong_pk, comp);
        // Served as written, and listed by 2.8 from 2.26's listing.
        let (code, body) = curl(&[&format!("{}/{}.narinfo", d.url, digest(&closure.app))]);
        assert_eq!(code, 200);
        assert_eq!(
            body,
            std::fs::read(dir.join(format!("{}.narinfo", digest(&closure.app)))).unwrap()
        );
        let ls = old.run(
            "nix",
            &["store", "ls", "--store", &d.url, "-R", &closure.app],
        );
        assert!(ls.contains("./bin/hi"), "{ls}");

        // The same paths written by 2.8 (from the store it substituted into) carry the same
        // narinfo fields with the same values: 2.26 adds none that 2.8 would not write. Only
        // the compressed file may differ (another compressor build).
        let again = old.path(&format!("again-{comp}"));
        let sub = old.path(&format!("sub-{comp}"));
        old.run(
            "nix",
            &[
                "copy",
                "--from",
                sub.to_str().unwrap(),
                "--to",
                &format!(
                    "file://{}?compression={comp}&secret-key={}",
                    again.display(),
                    sk.display()
                ),
                &closure.app,
            ],
        );
        let (by_226, by_28) = (narinfos(&dir), narinfos(&again));
        assert_eq!(by_226.len(), by_28.len(), "{by_226:?}\n{by_28:?}");
        for ((d1, n226), (d2, n28)) in by_226.iter().zip(&by_28) {
            assert_eq!(d1, d2);
            let (f226, f28): (BTreeSet<_>, BTreeSet<_>) = (
                fields(n226).into_iter().collect(),
                fields(n28).into_iter().collect(),
            );
            assert_eq!(
                f226, f28,
                "narinfo fields of {d1}:\n2.26:\n{n226}\n2.8:\n{n28}"
            );
            let same = |n: &str| -> Vec<String> {
                n.lines()
                    .filter(|l| {
                        !["URL:", "FileHash:", "FileSize:"]
                            .iter()
                            .any(|k| l.starts_with(k))
                    })
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(same(n226), same(n28), "narinfo of {d1}");
        }
    }
}

/// `nix copy --to http://…` from each client into `serve --allow-push` (with the write
/// credential from a netrc file): the cache each push lands is consistent (`fsck` finds
/// nothing), carries the server's signature, and both clients substitute from it.
#[test]
fn both_clients_push_with_nix_copy_and_both_substitute_what_each_pushed() {
    for pusher in BOTH {
        let env = NixEnv::with_client(pusher);
        let closure = env.build_closure();
        let (sk, pk) = env.keypair("pushed-1");
        let (_, wrong_pk) = env.keypair("pushed-wrong");
        let cache = env.path("pushed");
        std::fs::create_dir_all(&cache).unwrap();
        let url = format!("file://{}", cache.display());
        let d = common::credentials::serve_pushable(&env, &url, &sk, &[]);
        env.copy_to(&format!("{}?write-nar-listing=1", d.url), &[&closure.app]);
        let fsck = env
            .cmd(env!("CARGO_BIN_EXE_nixcached"))
            .args(["fsck", "--trusted-public-key", &pk, &url])
            .output()
            .unwrap();
        common::assert_succeeded(&fsck);
        for p in &closure.paths {
            let ni = std::fs::read_to_string(cache.join(format!("{}.narinfo", digest(p))))
                .unwrap_or_else(|e| panic!("{pusher:?} pushed no narinfo for {p}: {e}"));
            assert!(ni.contains("Sig: pushed-1:"), "{pusher:?}: {ni}");
        }
        for client in BOTH {
            let fresh = NixEnv::with_client(client);
            let tag = format!("{pusher:?}-to-{client:?}");
            substitute_and_verify(&fresh, &d.url, &closure.app, &pk, &wrong_pk, &tag);
        }
    }
}

/// A content-addressed derivation's output, found by each client through its realisation
/// (`realisations/<id>.doi`) served from the local store, with no local build allowed.
#[test]
fn both_clients_substitute_a_content_addressed_output_through_its_realisation() {
    use common::ca::{build_ca, substitute_ca, CA};
    let src = NixEnv::new();
    src.set_nix_config(Some(CA.into()));
    let (drv, out, _, _) = build_ca(&src);
    let (sk, pk) = src.keypair("ca-modern-1");
    let d = Daemon::start(
        &src,
        &[
            "serve",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &format!("local?root={}", src.store_arg()),
        ],
    );
    for client in BOTH {
        substitute_ca(client, &src, &d.url, &pk, &drv, &out, "realised");
    }
}
