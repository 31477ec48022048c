//! A store that is down never takes the daemon down: `serve` starts with its bucket
//! unreachable, answers Nix with 404 (never 5xx) and says why in the log and on `/healthz`,
//! and serves again by itself once the bucket is back. Against the real daemon, a private
//! moto (S3) that the tests stop and start, and the real Nix client.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::peers::{free_port, fresh_name, Moto};
use common::{curl, Daemon, NixEnv};

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

/// The store-path digest of `/nix/store/<digest>-name`.
fn digest(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

fn s3_url(endpoint: &str, bucket: &str) -> String {
    format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1")
}

/// Creates a bucket on a moto at `endpoint` (moto checks no signatures).
fn create_bucket(endpoint: &str, bucket: &str) {
    let (code, body) = curl(&["-X", "PUT", &format!("{endpoint}/{bucket}")]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

/// Uploads the closure of `path` to the cache at `url` with `nixcached upload`, signed by `sk`.
fn upload(env: &NixEnv, url: &str, sk: &std::path::Path, path: &str) {
    let input = env.path(&fresh_name("paths"));
    std::fs::write(&input, format!("{path}\n")).unwrap();
    let out = env
        .cmd(BIN)
        .args(["upload", "--input", input.to_str().unwrap()])
        .args(["--secret-key-file", sk.to_str().unwrap()])
        .args(["--progress-interval", "0", "--compression", "xz"])
        .args([
            "--state-dir",
            env.path(&fresh_name("state")).to_str().unwrap(),
        ])
        .args(["--from", &format!("local?root={}", env.store_arg()), url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "upload to {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `check` every 100 ms until it holds; panics with `what` after `secs` seconds.
/// Returns how long it took.
fn wait_until(secs: u64, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn get(url: &str) -> (u16, String) {
    let (code, body) = curl(&[url]);
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// What a Nix client asks a cache for, answered without a 5xx; every answer must be 404
/// except `nix-cache-info`, which keeps the cache usable for when the store comes back.
fn assert_protocol_misses(base: &str, app: &str) {
    let (code, info) = get(&format!("{base}/nix-cache-info"));
    assert_eq!(code, 200, "nix-cache-info of a degraded cache: {info}");
    assert!(info.contains("StoreDir: /nix/store"), "{info}");
    for rel in [
        format!("{}.narinfo", digest(app)),
        format!("{}.ls", digest(app)),
        "nar/0000000000000000000000000000000000000000000000000000.nar.xz".to_owned(),
        format!("log/{}-x.drv", digest(app)),
    ] {
        let (code, body) = get(&format!("{base}/{rel}"));
        assert_eq!(code, 404, "{rel} from a degraded cache: {body}");
        let (code, _) = curl(&["-I", &format!("{base}/{rel}")]);
        assert_eq!(code, 404, "HEAD {rel} from a degraded cache");
    }
}

/// `serve s3://…` with its S3 server not running: the daemon starts anyway, and serves the
/// bucket once it is there, with no restart.
#[test]
fn serve_starts_with_s3_down_and_serves_once_it_is_up() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("down-1");
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let bucket = fresh_name("down");
    let url = s3_url(&endpoint, &bucket);

    let d = Daemon::start(&env, &["serve", &url]);
    assert_protocol_misses(&d.url, &closure.app);
    let (code, health) = get(&format!("{}/healthz", d.url));
    assert_eq!(code, 503, "{health}");
    assert!(health.starts_with("degraded"), "{health}");
    assert!(health.contains(&bucket), "names the cache: {health}");
    assert!(
        health.contains("127.0.0.1") || health.contains("connect"),
        "says why: {health}"
    );
    assert!(d.logged("degraded"), "the log says the cache is degraded");
    assert_eq!(d.metric("nixcached_store_up"), 0);

    let _moto = Moto::start(port);
    create_bucket(&endpoint, &bucket);
    upload(&env, &url, &sk, &closure.app);
    let narinfo = format!("{}/{}.narinfo", d.url, digest(&closure.app));
    let took = wait_until(20, "the narinfo is served once S3 is up", || {
        get(&narinfo).0 == 200
    });
    eprintln!("served {took:?} after the bucket was filled");
    let (code, health) = get(&format!("{}/healthz", d.url));
    assert_eq!(code, 200, "{health}");
    assert!(health.starts_with("ok"), "{health}");
    assert!(d.logged("serving again"), "the log says the cache is back");
    assert_eq!(d.metric("nixcached_store_up"), 1);
    env.substitute_from(&d.url, &closure.app, &pk, "after-start");
}

/// A daemon run from a config file, with the URL of each cache by its store description.
struct ConfigDaemon {
    child: std::process::Child,
    urls: HashMap<String, String>,
}

impl ConfigDaemon {
    fn start(env: &NixEnv, config: &str, caches: usize) -> ConfigDaemon {
        let file = env.path("nixcached.toml");
        std::fs::write(&file, config).unwrap();
        let mut child = env
            .cmd(BIN)
            .args(["--config", file.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("[nixcached] {line}");
                if let Some(i) = line.find("Listening on ") {
                    let rest = &line[i + "Listening on ".len()..];
                    if let Some((url, desc)) = rest.split_once(" serving ") {
                        let _ = tx.send((desc.to_owned(), url.trim_end_matches('/').to_owned()));
                    }
                }
            }
        });
        let mut d = ConfigDaemon {
            child,
            urls: HashMap::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.urls.len() < caches {
            let left = deadline.saturating_duration_since(Instant::now());
            let (desc, url) = rx
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{caches} caches listening ({e}); got {:?}", d.urls));
            d.urls.insert(desc, url);
        }
        d
    }

    fn url_of(&self, needle: &str) -> String {
        self.urls
            .iter()
            .find(|(desc, _)| desc.contains(needle))
            .map(|(_, u)| u.clone())
            .unwrap_or_else(|| panic!("no cache {needle} in {:?}", self.urls))
    }
}

impl Drop for ConfigDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three caches in one process, two of them on buckets nobody answers for (S3 and GCS):
/// the healthy one serves, the others answer 404, and `/healthz` names the culprits.
#[test]
fn config_with_an_unreachable_bucket_serves_the_healthy_caches() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("down-2");
    let (good_endpoint, good_bucket) = common::peers::new_s3_bucket("good");
    let good = s3_url(&good_endpoint, &good_bucket);
    upload(&env, &good, &sk, &closure.app);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let down_bucket = fresh_name("unreachable");
    let down_s3 = s3_url(&dead, &down_bucket);
    let down_gcs_bucket = fresh_name("unreachable-gcs");
    let down_gcs = format!("gs://{down_gcs_bucket}?endpoint={dead}");
    let config = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[[cache]]
store = "{good}"
prefix = "/good"

[[cache]]
store = "{down_s3}"
prefix = "/down"

[[cache]]
store = "{down_gcs}"
listen = ["127.0.0.1:0"]
"#
    );
    let d = ConfigDaemon::start(&env, &config, 3);
    let good_url = d.url_of(&good_bucket);
    let down_url = d.url_of(&down_bucket);
    let gcs_url = d.url_of(&down_gcs_bucket);
    assert!(good_url.ends_with("/good"), "{good_url}");
    assert!(down_url.ends_with("/down"), "{down_url}");

    env.substitute_from(&good_url, &closure.app, &pk, "good");
    assert_protocol_misses(&down_url, &closure.app);
    assert_protocol_misses(&gcs_url, &closure.app);

    // Per cache, below its prefix.
    let (code, body) = get(&format!("{good_url}/healthz"));
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok"), "{body}");
    let (code, body) = get(&format!("{down_url}/healthz"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&down_bucket), "{body}");
    assert!(!body.contains(&good_bucket), "{body}");
    // Every cache of a listener at its root: one line each.
    let root = good_url.trim_end_matches("/good");
    let (code, body) = get(&format!("{root}/healthz"));
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("degraded"), "{body}");
    let line_of = |needle: &str| {
        body.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line for {needle} in {body}"))
            .to_owned()
    };
    assert!(line_of(&good_bucket).starts_with("ok"), "{body}");
    assert!(line_of(&down_bucket).starts_with("degraded"), "{body}");
    let (code, body) = get(&format!("{gcs_url}/healthz"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&down_gcs_bucket), "{body}");
}

/// S3 goes away while the daemon serves it and comes back (empty, as moto does; the bucket is
/// filled again): in between every request gets a 404, never a 5xx, and afterwards the cache
/// serves again with no restart.
#[test]
fn s3_outage_while_serving_answers_404_and_recovers() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("down-3");
    let port = free_port();
    let moto = Moto::start(port);
    let endpoint = moto.endpoint();
    let bucket = fresh_name("outage");
    let url = s3_url(&endpoint, &bucket);
    create_bucket(&endpoint, &bucket);
    upload(&env, &url, &sk, &closure.app);
    let d = Daemon::start(&env, &["serve", &url]);
    let (code, health) = get(&format!("{}/healthz", d.url));
    assert_eq!(code, 200, "{health}");
    env.substitute_from(&d.url, &closure.app, &pk, "before");
    let narinfo = format!("{}/{}.narinfo", d.url, digest(&closure.app));
    let (code, text) = get(&narinfo);
    assert_eq!(code, 200);
    let nar = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();

    drop(moto);
    // The first request after the outage finds it: a NAR cannot come from anywhere else.
    let (code, body) = get(&format!("{}/{nar}", d.url));
    assert_eq!(code, 404, "{nar} during the outage: {body}");
    // A narinfo the daemon remembers may still go out until the outage is noticed; nothing
    // is a 5xx, which would make Nix drop the cache for the rest of its run.
    for rel in [
        format!("{}.narinfo", digest(&closure.lib)),
        format!("{}.ls", digest(&closure.app)),
    ] {
        let (code, body) = get(&format!("{}/{rel}", d.url));
        assert!(
            code == 200 || code == 404,
            "{rel} during the outage: {code} {body}"
        );
    }
    wait_until(15, "/healthz reports the outage", || {
        get(&format!("{}/healthz", d.url)).0 == 503
    });
    let (_, health) = get(&format!("{}/healthz", d.url));
    assert!(health.starts_with("degraded"), "{health}");
    assert!(d.logged("degraded"), "the log says the cache is degraded");
    // Even what the daemon remembers is not handed out: its NAR cannot be fetched now.
    assert_protocol_misses(&d.url, &closure.app);
    assert_eq!(get(&format!("{}/{nar}", d.url)).0, 404);

    let _moto = Moto::start(port);
    create_bucket(&endpoint, &bucket);
    upload(&env, &url, &sk, &closure.app);
    let took = wait_until(20, "the narinfo is served again", || get(&narinfo).0 == 200);
    eprintln!("served again {took:?} after the bucket was refilled");
    assert_eq!(get(&format!("{}/healthz", d.url)).0, 200);
    assert_eq!(get(&format!("{}/{nar}", d.url)).0, 200);
    let fresh = env.path("fresh-after");
    env.copy_from(&d.url, fresh.to_str().unwrap(), Some(&pk), &closure.app);
    env.verify(fresh.to_str().unwrap(), Some(&pk), &closure.app);
}

/// A loopback port that forwards every connection to `to` while it is up: stopping it cuts
/// the connections it carries and refuses new ones, as a host that goes down would.
struct TcpGate {
    stop: Arc<AtomicBool>,
    port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl TcpGate {
    fn open(port: u16, to: SocketAddr) -> TcpGate {
        // std sets SO_REUSEADDR, so the port is free again as soon as the last gate closed.
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("the gate's port is free");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(to) else {
                        continue;
                    };
                    let mut held = conns.lock().unwrap();
                    for s in [&client, &server] {
                        held.push(s.try_clone().unwrap());
                    }
                    for (mut from, mut into) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut into);
                            let _ = into.shutdown(Shutdown::Write);
                        });
                    }
                }
            })
        };
        TcpGate {
            stop,
            port,
            conns,
            accept: Some(accept),
        }
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The test sshd of `scripts/test`, as `(user@host, its address, key file)`.
fn sshd() -> (String, SocketAddr, String) {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: this test needs the sshd of the test bed (scripts/test)")
        })
    };
    var("NIX_SSHOPTS");
    let host = var("NIXCACHED_TEST_SSH_HOST");
    let port: u16 = var("NIXCACHED_TEST_SSH_PORT").parse().unwrap();
    let ip = host.rsplit('@').next().unwrap();
    let addr = SocketAddr::new(ip.parse().unwrap(), port);
    (host, addr, var("NIXCACHED_TEST_SSH_KEY"))
}

/// `serve ssh://…` with the host down at start, then up, then down and up again: the daemon
/// starts anyway, answers 404 while it cannot log in, says why, and serves again by itself.
#[test]
fn serve_over_ssh_starts_with_the_host_down_and_rides_out_an_outage() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("down-ssh");
    let (host, sshd, key) = sshd();
    let port = free_port();
    let url = format!(
        "ssh://{}127.0.0.1:{port}?remote-store={}&ssh-key={key}",
        host.rsplit_once('@')
            .map(|(user, _)| format!("{user}@"))
            .unwrap_or_default(),
        env.store_root().display()
    );

    // A miss is remembered for --negative-ttl (30 s by default), and the remote store is
    // listed at most every 5 s: the path added below may be asked for before the listing
    // that finds it, and must not be remembered as missing for longer than the test waits.
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--negative-ttl",
            "1s",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &url,
        ],
    );
    assert_protocol_misses(&d.url, &closure.app);
    let health = wait_until_health(&d.url, 503);
    assert!(health.starts_with("degraded"), "{health}");
    assert!(health.contains("cannot reach"), "says why: {health}");
    assert!(d.logged("degraded"), "the log says the cache is degraded");
    assert_eq!(d.metric("nixcached_store_up"), 0);

    let gate = TcpGate::open(port, sshd);
    let narinfo = format!("{}/{}.narinfo", d.url, digest(&closure.app));
    let took = wait_until(20, "the narinfo is served once the host is up", || {
        get(&narinfo).0 == 200
    });
    eprintln!("served {took:?} after the host came up");
    assert!(wait_until_health(&d.url, 200).starts_with("ok"));
    assert!(d.logged("serving again"), "the log says the cache is back");
    env.substitute_from(&d.url, &closure.app, &pk, "ssh-up");

    // The host goes away with sessions open: the next request that needs it finds out.
    drop(gate);
    let (code, body) = get(&format!("{}/{}.ls", d.url, digest(&closure.lib)));
    assert_eq!(code, 404, "a listing during the outage: {body}");
    let health = wait_until_health(&d.url, 503);
    assert!(health.contains("cannot reach"), "says why: {health}");
    assert_protocol_misses(&d.url, &closure.app);

    // Back again, with a path added meanwhile: found without a restart.
    let added = env.path("added-during-outage");
    std::fs::write(&added, "new while the host was down\n").unwrap();
    let added = env.add(&added);
    let _gate = TcpGate::open(port, sshd);
    let narinfo = format!("{}/{}.narinfo", d.url, digest(&added));
    wait_until(20, "a path added during the outage is served", || {
        get(&narinfo).0 == 200
    });
    assert!(wait_until_health(&d.url, 200).starts_with("ok"));
    env.substitute_from(&d.url, &added, &pk, "ssh-again");
}

/// Waits until `/healthz` answers `code`; returns its text.
fn wait_until_health(base: &str, code: u16) -> String {
    let mut text = String::new();
    wait_until(20, &format!("/healthz answers {code}"), || {
        let (c, t) = get(&format!("{base}/healthz"));
        text = t;
        c == code
    });
    text
}
