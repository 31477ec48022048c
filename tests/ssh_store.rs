//! The `ssh://` store against a real sshd on loopback and the real `nix-store --serve`, with
//! the remote side in a chroot store of its own (`?remote-store=`).
//!
//! Needs the peers of `scripts/test` (sshd, its key, `NIX_SSHOPTS`); without them every test
//! here fails, saying so.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::conformance::{bytes_stream, fixture, suite, Fixture};
use common::{block_on, NixEnv};
use nixcached_actors::formats::{Compression, Digest, SecretKey};
use nixcached_actors::publish::{publish, publish_path, PublishOptions};
use nixcached_actors::store::local::{LocalStore, LocalStoreLayout};
use nixcached_actors::store::ssh::target::SshTarget;
use nixcached_actors::store::ssh::SshStore;
use nixcached_actors::store::url::StoreUrl;
use nixcached_actors::store::{Store, StoreError};

/// Where the test sshd is, from the environment `scripts/test` exports.
struct Peer {
    /// `user@host`
    host: String,
    port: String,
    key: String,
}

fn peer() -> Peer {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: these tests need the sshd of the test bed; run scripts/test, \
                 or `scripts/test --peers-only > /tmp/peers.env &` and `set -a; . /tmp/peers.env; set +a`"
            )
        })
    };
    // ssh's own options (host key checking off, the key) come from here, as for Nix.
    var("NIX_SSHOPTS");
    Peer {
        host: var("NIXCACHED_TEST_SSH_HOST"),
        port: var("NIXCACHED_TEST_SSH_PORT"),
        key: var("NIXCACHED_TEST_SSH_KEY"),
    }
}

impl Peer {
    /// An ssh store URL whose remote side is the chroot store at `root`.
    fn url(&self, root: &Path) -> String {
        format!(
            "ssh://{}:{}?remote-store={}&ssh-key={}",
            self.host,
            self.port,
            root.display(),
            self.key
        )
    }
}

fn open(url: &str) -> SshStore {
    SshStore::open(SshTarget::parse(url).unwrap()).unwrap()
}

/// The ssh processes this test process started for `remote_root`, with `--write` or not.
fn ssh_children(remote_root: &Path, write: bool) -> Vec<u32> {
    let me = std::process::id().to_string();
    let root = remote_root.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid …
        let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let mut fields = after.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid != Some(me.as_str()) || state == Some("Z") {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.starts_with("ssh ")
            && cmdline.contains(&root)
            && cmdline.contains("--serve")
            && cmdline.contains("--write") == write
        {
            found.push(pid);
        }
    }
    found
}

fn nar_of(fx: &Fixture, digest: Digest) -> Vec<u8> {
    fx.objects
        .iter()
        .find(|o| o.0 == digest)
        .map(|o| o.1.clone())
        .unwrap()
}

#[test]
fn conformance_over_ssh() {
    let peer = peer();
    let env = NixEnv::new();
    let fx = fixture(&env);
    // Through StoreUrl, as `nixcached serve ssh://…` opens it.
    let store = StoreUrl::parse(&peer.url(&env.store_root()))
        .unwrap()
        .open()
        .unwrap();
    block_on(async {
        let started = Instant::now();
        suite(store.clone(), &fx, false).await;
        eprintln!("conformance suite over ssh: {:?}", started.elapsed());

        // Build logs come from the remote host's Nix.
        let drv = env.deriver_of(&fx.closure.lib);
        let log = store.log(&drv).await.unwrap().into_bytes().await.unwrap();
        assert!(
            String::from_utf8_lossy(&log).contains("building testlib"),
            "{}",
            String::from_utf8_lossy(&log)
        );
        let no_log = format!("{}-none.drv", "0".repeat(32));
        assert!(store.log(&no_log).await.unwrap_err().is_not_found());
        assert!(matches!(
            store.put_log(&drv, bytes_stream(b"x")).await,
            Err(StoreError::Unsupported(_))
        ));
        // Derivations are store paths too: listed and served.
        let drv_digest = Digest::parse(&drv[..32]).unwrap();
        assert!(store.list().await.unwrap().contains(&drv_digest));
        assert!(store
            .narinfo(&drv_digest)
            .await
            .unwrap()
            .store_path
            .is_derivation());
    });
}

#[test]
fn narinfo_lookups_keep_flowing_while_a_nar_streams() {
    let peer = peer();
    let env = NixEnv::new();
    let fx = fixture(&env);
    let store = open(&peer.url(&env.store_root()));
    block_on(async {
        let app = Digest::parse(&fx.closure.app["/nix/store/".len()..][..32]).unwrap();
        let info = store.narinfo(&app).await.unwrap();
        // Hold a NAR stream open without reading it: its session is busy.
        let held = store.nar(&info.url, None).await.unwrap();
        let started = Instant::now();
        for (digest, ..) in &fx.objects {
            store.narinfo(digest).await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lookups were held up: {:?}",
            started.elapsed()
        );
        assert!(held.into_bytes().await.unwrap() == nar_of(&fx, app));
        // A fully read NAR leaves its session reusable: the next NAR needs no new login.
        let before = ssh_children(&env.store_root(), false);
        assert_eq!(before.len(), 1, "one idle dump session: {before:?}");
        let again = store.nar(&info.url, None).await.unwrap();
        assert!(again.into_bytes().await.unwrap() == nar_of(&fx, app));
        assert_eq!(ssh_children(&env.store_root(), false), before);
    });
}

#[test]
fn reconnects_after_the_ssh_process_dies() {
    let peer = peer();
    let env = NixEnv::new();
    let fx = fixture(&env);
    let store = open(&peer.url(&env.store_root()));
    let digest = fx.objects[0].0;
    block_on(async {
        store.narinfo(&digest).await.unwrap();
        let pids = ssh_children(&env.store_root(), true);
        assert_eq!(pids.len(), 1, "one metadata connection: {pids:?}");
        let old = pids[0];
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &old.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while ssh_children(&env.store_root(), true).contains(&old) {
            assert!(Instant::now() < deadline, "ssh {old} did not die");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The very next request logs in again and succeeds.
        let info = store.narinfo(&digest).await.unwrap();
        assert_eq!(*info.store_path.digest(), digest);
        let now = ssh_children(&env.store_root(), true);
        assert_eq!(now.len(), 1, "{now:?}");
        assert_ne!(now[0], old);
    });
    // Dropping the store ends its ssh processes.
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ssh_children(&env.store_root(), true).is_empty() {
        assert!(Instant::now() < deadline, "ssh outlived its store");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_query_whose_connection_drops_mid_request_is_asked_again_on_a_new_login() {
    let peer = peer();
    let env = NixEnv::new();
    let fx = fixture(&env);
    // A remote program that greets like `nix-store --serve`, then drops the connection in the
    // middle of the first request; every later login runs the real nix-store.
    let marker = env.path("dropped-once");
    let program = env.path("flaky-nix-store");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\nif [ ! -e {m} ]; then\n  touch {m}\n  head -c 16 >/dev/null\n  printf '\\313\\356\\122\\124\\000\\000\\000\\000\\007\\002\\000\\000\\000\\000\\000\\000'\n  head -c 8 >/dev/null\n  echo 'flaky: dropping the connection' >&2\n  exit 1\nfi\nexec nix-store \"$@\"\n",
            m = marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let url = format!(
        "{}&remote-program={}",
        peer.url(&env.store_root()),
        program.display()
    );
    let store = open(&url);
    let digest = fx.objects[0].0;
    block_on(async {
        // Logs in (the handshake alone, which the flaky program answers).
        store.check().await.unwrap();
        // The connection opened at start-up dies in the middle of the lookup; a lookup is
        // read-only, so it is asked again on a new login instead of failing (a failure here
        // would reach Nix as a 404, which it caches as "missing" for an hour).
        let info = store.narinfo(&digest).await.unwrap();
        assert_eq!(*info.store_path.digest(), digest);
        assert!(
            marker.exists(),
            "the first login really dropped the connection"
        );
        let info = store.narinfo(&fx.objects[1].0).await.unwrap();
        assert_eq!(*info.store_path.digest(), fx.objects[1].0);
    });
}

/// Publishes `fx`'s closure from the local chroot store into the ssh store at `remote`, then
/// checks with the real Nix that every path is valid there, with its references and
/// signature.
fn publish_and_verify(
    env: &NixEnv,
    fx: &Fixture,
    store: &SshStore,
    remote: &Path,
    opts: &PublishOptions,
) {
    let local: Arc<dyn Store> =
        Arc::new(LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap());
    block_on(async {
        let started = Instant::now();
        // Fixture objects are in `nix-store -qR` order: references first.
        for (digest, ..) in &fx.objects {
            let written = publish(&*local, store, digest, opts).await.unwrap();
            assert_eq!(written.compression, opts.compression);
        }
        eprintln!(
            "published {} paths over ssh ({}): {:?}",
            fx.objects.len(),
            opts.compression,
            started.elapsed()
        );
        for (digest, nar, refs, _) in &fx.objects {
            // The store answers for what it imported, at once.
            let ni = store.narinfo(digest).await.unwrap();
            let mut got: Vec<String> = ni.references.iter().map(|r| r.to_string()).collect();
            got.sort();
            assert_eq!(&got, refs);
            let back = store
                .nar(&ni.url, None)
                .await
                .unwrap()
                .into_bytes()
                .await
                .unwrap();
            assert!(&back == nar);
            for key in &opts.keys {
                assert!(
                    ni.sigs.iter().any(|s| s.key_name == key.name()),
                    "{digest} lacks a signature by {}",
                    key.name()
                );
            }
        }
    });
    let remote_arg = remote.display().to_string();
    for path in &fx.closure.paths {
        env.run(
            "nix-store",
            &["--store", &remote_arg, "--verify-path", path],
        );
        let json = env.run(
            "nix",
            &["path-info", "--store", &remote_arg, "--json", path],
        );
        let info: serde_json::Value = serde_json::from_str(&json).unwrap();
        let info = &info[0];
        assert_eq!(info["path"], path.as_str(), "{json}");
        let want: Vec<String> = env
            .run(
                "nix-store",
                &["--store", &env.store_arg(), "-q", "--references", path],
            )
            .lines()
            .map(str::to_owned)
            .collect();
        let mut got: Vec<String> = info["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        got.sort();
        let mut want = want;
        want.sort();
        assert_eq!(got, want, "{path}");
        for key in &opts.keys {
            assert!(json.contains(&format!("\"{}:", key.name())), "{json}");
        }
    }
}

#[test]
fn publish_a_closure_into_an_ssh_store() {
    let peer = peer();
    let env = NixEnv::new();
    let fx = fixture(&env);
    let (sk, _pk) = env.keypair("ssh-test-1");
    let key = SecretKey::parse(&std::fs::read_to_string(sk).unwrap()).unwrap();

    // AddToStoreNar (the server speaks 2.7), from zstd-compressed NARs, signed.
    let remote = env.path("remote-zstd");
    let store = open(&peer.url(&remote));
    let opts = PublishOptions {
        compression: Compression::Zstd,
        keys: vec![key],
        ..PublishOptions::default()
    };
    publish_and_verify(&env, &fx, &store, &remote, &opts);
    // Publishing again finds the paths valid and sends nothing.
    block_on(async {
        let local = LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap();
        let started = Instant::now();
        for (digest, ..) in &fx.objects {
            publish(&local, &store, digest, &opts).await.unwrap();
        }
        eprintln!("re-published (already valid): {:?}", started.elapsed());
        let mut listed = store.list().await.unwrap();
        listed.sort();
        let mut want: Vec<Digest> = fx.objects.iter().map(|o| o.0).collect();
        want.sort();
        assert_eq!(listed, want);
    });

    // ImportPaths, the command of servers before 2.5, from uncompressed NARs.
    let remote = env.path("remote-legacy");
    let store =
        SshStore::open_forcing_import_paths(SshTarget::parse(&peer.url(&remote)).unwrap()).unwrap();
    let opts = PublishOptions {
        compression: Compression::None,
        ..PublishOptions::default()
    };
    publish_and_verify(&env, &fx, &store, &remote, &opts);
}

#[test]
fn imports_refuse_bad_nars_and_missing_references() {
    let peer = peer();
    let env = NixEnv::new();
    let fx = fixture(&env);
    let local = LocalStore::open(LocalStoreLayout::chroot(&env.store_root())).unwrap();
    let app = Digest::parse(&fx.closure.app["/nix/store/".len()..][..32]).unwrap();
    let remote = env.path("remote");
    let remote_arg = remote.display().to_string();
    let invalid = |path: &str| {
        !env.output(
            "nix-store",
            &["--store", &remote_arg, "--check-validity", path],
        )
        .status
        .success()
    };
    for legacy in [false, true] {
        let target = SshTarget::parse(&peer.url(&remote)).unwrap();
        let store = if legacy {
            SshStore::open_forcing_import_paths(target).unwrap()
        } else {
            SshStore::open(target).unwrap()
        };
        block_on(async {
            // The app's references are not there yet: the remote Nix refuses it (`publish`
            // would write them first; `publish_path` leaves that to the caller).
            let err = publish_path(&local, &store, &app, &PublishOptions::default())
                .await
                .unwrap_err();
            eprintln!("missing references (legacy={legacy}): {err}");
            // The remote Nix names the reference it lacks.
            let lib = format!("path '{}' is not valid", fx.closure.lib);
            assert!(err.to_string().contains(&lib), "{err}");
            assert!(invalid(&fx.closure.app));

            // A NAR that does not match its narinfo is refused, and nothing is added.
            let (dep, ..) = &fx.objects[0];
            let info = local.narinfo(dep).await.unwrap();
            let wrong = vec![b'x'; info.nar_size as usize];
            let url = format!(
                "nar/{}.nar",
                nixcached_actors::formats::nixbase32::encode(info.nar_hash.digest())
            );
            let stream: nixcached_actors::store::ByteStream =
                Box::pin(futures::stream::once(async move {
                    Ok(bytes::Bytes::from(wrong))
                }));
            store.put_nar(&url, stream).await.unwrap();
            let mut ni = info.clone();
            ni.url = url;
            ni.compression = Compression::None;
            let err = store.put_narinfo(&ni).await.unwrap_err();
            eprintln!("bad NAR (legacy={legacy}): {err}");
            if legacy {
                // The ImportPaths server cannot check the NAR's hash, so the uploader does.
                assert!(
                    matches!(&err, StoreError::Corrupt(m) if m.contains("but its narinfo says")),
                    "{err:?}"
                );
            } else {
                // AddToStoreNar: the remote Nix parses what it is given.
                assert!(err.to_string().contains("bad archive"), "{err}");
            }
            assert!(invalid(&fx.closure.paths[0]));
            // The store is still usable after the refusals.
            assert!(store.narinfo(dep).await.unwrap_err().is_not_found());
        });
    }
}

#[test]
fn errors_say_what_is_wrong() {
    let peer = peer();
    let env = NixEnv::new();
    let root = env.store_root().display().to_string();
    let host = peer
        .host
        .split_once('@')
        .map(|(_, h)| h)
        .unwrap_or(&peer.host);
    let cases = [
        (
            format!("ssh://root@{host}:1?remote-store={root}"),
            "cannot reach",
        ),
        (
            format!("ssh://nobody@{host}:{}?remote-store={root}", peer.port),
            "refused the ssh login",
        ),
        (
            format!(
                "ssh://{}:{}?remote-store={root}&remote-program=/nonexistent/nix-store",
                peer.host, peer.port
            ),
            "`/nonexistent/nix-store` was not found",
        ),
        (
            format!("ssh://{}:{}?remote-store=bogus://x", peer.host, peer.port),
            "bogus://x",
        ),
    ];
    for (url, want) in cases {
        // Opening never logs in (a host that is down must not stop a daemon from starting);
        // the first exchange does, and says what is wrong.
        let store =
            SshStore::open(SshTarget::parse(&url).unwrap()).expect("opens without logging in");
        let err = match futures::executor::block_on(store.check()) {
            Ok(()) => panic!("{url} logged in"),
            Err(e) => e.to_string(),
        };
        let probe = futures::executor::block_on(store.cache_info())
            .expect_err("the health probe fails too")
            .to_string();
        assert!(
            probe.contains(want),
            "{url}: the probe says {probe:?}, not {want:?}"
        );
        eprintln!("{url}: {err}");
        assert!(err.contains(want), "{url}: {err:?} should say {want:?}");
    }
    assert!(matches!(
        StoreUrl::parse("ssh://host?no-such-option=1"),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn nix_substitutes_through_serve_over_ssh() {
    let peer = peer();
    let env = NixEnv::new();
    let fx = fixture(&env);
    let (sk, pk) = env.keypair("serve-ssh-1");
    let d = common::Daemon::start(
        &env,
        &[
            "serve",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &peer.url(&env.store_root()),
        ],
    );
    let fresh = env.path("fresh");
    env.copy_from(&d.url, fresh.to_str().unwrap(), Some(&*pk), &fx.closure.app);
    for p in &fx.closure.paths {
        env.run(
            "nix-store",
            &["--store", fresh.to_str().unwrap(), "--verify-path", p],
        );
    }
    // `.ls` listings come from reading the NAR over ssh.
    let ls = env.run(
        "nix",
        &["store", "ls", "--store", &d.url, "-R", &fx.closure.app],
    );
    assert!(ls.contains("./bin/hi"), "{ls}");
    // Build logs come from the remote Nix.
    let drv = env.deriver_of(&fx.closure.lib);
    let (code, log) = common::curl(&[&format!("{}/log/{drv}", d.url)]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&log).contains("building testlib"));
}

#[test]
fn large_nars_stream_both_ways_in_bounded_memory() {
    let peer = peer();
    let env = NixEnv::new();
    let big = env.path("big/data");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(256 * 1024 * 1024 + 17).unwrap();
    drop(f);
    let sp = env.add(big.parent().unwrap());
    let digest = Digest::parse(&sp["/nix/store/".len()..][..32]).unwrap();

    // Served over ssh by the daemon.
    let d = common::Daemon::start(&env, &["serve", &peer.url(&env.store_root())]);
    let started = Instant::now();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &format!("{}/nar/{digest}.nar", d.url),
        ])
        .output()
        .unwrap();
    let res = String::from_utf8(out.stdout).unwrap();
    let (code, size) = res.split_once(' ').unwrap();
    assert_eq!(code, "200");
    assert!(size.parse::<u64>().unwrap() > 256 * 1024 * 1024);
    let peak = d.peak_rss_kib();
    eprintln!(
        "256 MiB NAR served over ssh in {:?}, daemon peak RSS {} MiB",
        started.elapsed(),
        peak / 1024
    );
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");

    // Published into another remote store (spooled on disk, then imported) by `nixcached
    // upload`, whose peak RSS is read while it still runs, once the path is valid there.
    let remote = env.path("remote");
    let remote_arg = remote.display().to_string();
    let started = Instant::now();
    let mut up = env
        .cmd(env!("CARGO_BIN_EXE_nixcached"))
        .args(["upload", "--state-dir"])
        .arg(env.path("state"))
        .args(["--from", &format!("local?root={}", env.store_arg())])
        .arg(peer.url(&remote))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = up.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, format!("{sp}\n").as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !env
        .output(
            "nix-store",
            &["--store", &remote_arg, "--check-validity", &sp],
        )
        .status
        .success()
    {
        assert!(up.try_wait().unwrap().is_none(), "upload exited early");
        assert!(Instant::now() < deadline, "not published in 300 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", up.id())).unwrap();
    let peak: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    // End of input: the uploader finishes and exits.
    drop(input);
    assert!(up.wait().unwrap().success());
    eprintln!(
        "256 MiB NAR published over ssh by nixcached upload in {:?}, peak RSS {} MiB",
        started.elapsed(),
        peak / 1024
    );
    assert!(peak < 100 * 1024, "upload peak RSS {peak} KiB");
    env.run("nix-store", &["--store", &remote_arg, "--verify-path", &sp]);
}
