//! `serve` with upstreams, attacked: clients that name hosts in NAR keys, upstream narinfos
//! and redirects that lead elsewhere, an upstream that never stops sending, and narinfos
//! nobody vouched for. The daemon must contact nothing but its upstreams (and listed NAR
//! hosts), cut off what exceeds a narinfo, and sign only what a trusted key verified.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::upstream_server::{digest, nar_url, nix_cache, NarMode, PyServer};
use common::{curl, Daemon, NixEnv};

/// A port that counts every connection made to it and never answers: where a forged request
/// would go.
struct Canary {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Canary {
    fn start() -> Canary {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        Canary { port, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Sends `GET <target>` exactly as written (no client-side normalising) and returns the status.
fn raw_get(daemon: &Daemon, target: &str) -> u16 {
    let addr = daemon.url.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        conn,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    let _ = conn.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {target:?}: {text:?}"))
}

/// A field (`URL`, `FileSize`) of the narinfo of `path` in a cache folder.
fn field_in(dir: &Path, path: &str, field: &str) -> String {
    let prefix = format!("{field}: ");
    std::fs::read_to_string(dir.join(format!("{}.narinfo", digest(path))))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {field} in the narinfo of {path}"))
        .to_owned()
}

/// `serve --upstream UP --nar-cache-dir ENV/NARS EXTRA…`.
fn serve_upstream(env: &NixEnv, up: &PyServer, nars: &str, extra: &[&str]) -> Daemon {
    let nars = env.path(nars);
    let mut args = vec![
        "serve",
        "--upstream",
        &up.url,
        "--nar-cache-dir",
        nars.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Daemon::start(env, &args)
}

#[test]
fn no_request_path_makes_the_daemon_connect_to_a_host_it_names() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let dir = nix_cache(&env, "up", &up_sk, "xz", &closure.app);
    let up = PyServer::start(&dir, 0.0);
    let canary = Canary::start();
    let p = canary.port;
    // A forged request that reached the canary would wait a second, and count against the
    // real upstream's health (3 failures skip it).
    let daemon = serve_upstream(
        &env,
        &up,
        "nars",
        &["--trusted-public-key", &up_pk, "--upstream-timeout", "1s"],
    );
    let targets = [
        format!("/https:127.0.0.1:{p}/nar/x.nar"),
        format!("/http:127.0.0.1:{p}/nar/x.nar"),
        format!("/HTTPS:127.0.0.1:{p}/x"),
        format!("/hTTp:127.0.0.1:{p}/x"),
        format!("/ws:127.0.0.1:{p}/x"),
        format!("/ftp:127.0.0.1:{p}/x"),
        format!("//127.0.0.1:{p}/nar/x.nar"),
        format!("///127.0.0.1:{p}/x"),
        format!("/%2F%2F127.0.0.1:{p}/x"),
        format!("/%2f127.0.0.1:{p}/x"),
        format!("/https%3A127.0.0.1:{p}/x"),
        format!("/https%3a%2f%2f127.0.0.1:{p}/x"),
        format!("/https:%2F%2F127.0.0.1:{p}/x"),
        format!("/https:\\\\127.0.0.1:{p}/x"),
        format!("/\\\\127.0.0.1:{p}/x"),
        format!("/%5C%5C127.0.0.1:{p}/x"),
        format!("/nar/..%2F..%2Fhttps:127.0.0.1:{p}/x"),
        format!("/nar/../https:127.0.0.1:{p}/x"),
        format!("/nar/%2e%2e/https:127.0.0.1:{p}/x"),
        format!("/nar/x.nar?u=http://127.0.0.1:{p}/"),
        format!("/nar/x.nar#http://127.0.0.1:{p}/"),
        format!("/http:127.0.0.1:{p}%2Fnar%2Fx.nar.xz"),
        format!("/https:0x7f.1:{p}/x"),
        format!("/https:2130706433:{p}/x"),
        format!("/https:[::ffff:127.0.0.1]:{p}/x"),
        format!("/https:user@127.0.0.1:{p}/x"),
        format!("/https:127.0.0.1:{p}/{}.narinfo", digest(&closure.dep)),
        format!("/log/https:127.0.0.1:{p}/x"),
        format!("/log/..%2F..%2Fhttps:127.0.0.1:{p}/x.drv"),
        format!("/https:127.0.0.1:{p}/{}.ls", digest(&closure.dep)),
        "/file:///etc/passwd".to_owned(),
        "/nar/x.nar/../../../etc/passwd".to_owned(),
    ];
    for t in &targets {
        let code = raw_get(&daemon, t);
        assert!(
            code == 404 || code == 400,
            "{t:?} answered {code}; expected 404 (or 400 for what is no request path)"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        canary.hits(),
        0,
        "the daemon connected to a host named only in a request"
    );
    // The real upstream was never counted as failing: it answers, and a NAR asked for by
    // name alone (no narinfo served first) is still fetched, checked against its name.
    let (code, _) = curl(&[&format!("{}/{}.narinfo", daemon.url, digest(&closure.dep))]);
    assert_eq!(code, 200, "{:?}", daemon.log());
    let key = field_in(&dir, &closure.app, "URL");
    let fresh = serve_upstream(&env, &up, "nars2", &["--trusted-public-key", &up_pk]);
    let (code, body) = curl(&[&format!("{}/{key}", fresh.url)]);
    assert_eq!(code, 200);
    assert_eq!(body, std::fs::read(dir.join(&key)).unwrap());
    let realised = env.path("realised");
    env.realise_from(
        realised.to_str().unwrap(),
        &daemon.url,
        &up_pk,
        &closure.app,
    );
}

/// Rewrites every narinfo in `dir` to name its NAR at `prefix` + the relative URL.
fn make_urls_absolute(dir: &Path, prefix: &str) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "narinfo") {
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replace("URL: nar/", &format!("URL: {prefix}/nar/"));
            std::fs::write(&path, text).unwrap();
        }
    }
}

#[test]
fn absolute_narinfo_urls_are_followed_only_to_listed_hosts() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let dir = nix_cache(&env, "up", &up_sk, "xz", &closure.app);
    // The "CDN": another server with the same files, on a host:port no upstream has.
    let cdn = PyServer::start(&dir, 0.0);
    make_urls_absolute(&dir, &cdn.url);
    let up = PyServer::start(&dir, 0.0);

    let strict = serve_upstream(&env, &up, "nars-strict", &["--trusted-public-key", &up_pk]);
    let (code, _) = curl(&[&format!("{}/{}.narinfo", strict.url, digest(&closure.app))]);
    assert_eq!(code, 404, "a narinfo whose NAR is on an unlisted host");
    assert!(
        strict.logged("not an upstream nor a listed NAR host"),
        "{:?}",
        strict.log()
    );
    cdn.settle();
    assert_eq!(cdn.count("HEAD /nar/") + cdn.count("GET /nar/"), 0);

    let listed = substitute_with_cdn_listed(&env, &up, &up_pk, &cdn, &closure.app);
    let url = nar_url(&listed, &closure.app);
    assert!(
        url.starts_with("nar/"),
        "served under a name of ours: {url}"
    );
}

#[test]
fn redirects_are_followed_only_to_listed_hosts() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let dir = nix_cache(&env, "up", &up_sk, "xz", &closure.app);
    let cdn = PyServer::start(&dir, 0.0);
    let up = PyServer::start_with(&dir, NarMode::RedirectTo(cdn.url.clone()));
    let strict = serve_upstream(&env, &up, "nars-strict", &["--trusted-public-key", &up_pk]);
    let url = nar_url(&strict, &closure.app);
    let (code, _) = curl(&[&format!("{}/{url}", strict.url)]);
    assert_eq!(code, 404, "the NAR behind a redirect to an unlisted host");
    assert_eq!(cdn.settled_count("GET /nar/"), 0, "{:?}", cdn.log());
    assert!(strict.logged("redirected to"), "{:?}", strict.log());

    substitute_with_cdn_listed(&env, &up, &up_pk, &cdn, &closure.app);
}

/// With `cdn` listed as a NAR host, a real Nix substitutes `path` through the daemon, the
/// NARs coming from `cdn`.
fn substitute_with_cdn_listed(
    env: &NixEnv,
    up: &PyServer,
    up_pk: &str,
    cdn: &PyServer,
    path: &str,
) -> Daemon {
    let cdn_host = cdn.url.trim_start_matches("http://");
    let listed = serve_upstream(
        env,
        up,
        "nars-listed",
        &[
            "--trusted-public-key",
            up_pk,
            "--upstream-nar-host",
            cdn_host,
        ],
    );
    let fresh = env.path("fresh");
    env.realise_from(fresh.to_str().unwrap(), &listed.url, up_pk, path);
    assert!(cdn.count("GET /nar/") >= 1, "{:?}", cdn.log());
    listed
}

/// Total size of the files in `dir` (the NAR cache folder, part files included).
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn an_upstream_that_never_stops_sending_is_cut_off_at_the_narinfo_size() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let dir = nix_cache(&env, "up", &up_sk, "xz", &closure.app);
    let file_size: u64 = field_in(&dir, &closure.app, "FileSize").parse().unwrap();
    let up = PyServer::start_with(&dir, NarMode::Endless);
    let nars = env.path("nars");
    for (tag, keep) in [("disk cache", "1024"), ("proxy", "0")] {
        let daemon = serve_upstream(
            &env,
            &up,
            "nars",
            &["--trusted-public-key", &up_pk, "--nar-cache-size-mib", keep],
        );
        let url = nar_url(&daemon, &closure.app);
        let before = up.log().len();
        let asked = Instant::now();
        let (_, body) = curl(&["--max-time", "30", &format!("{}/{url}", daemon.url)]);
        assert!(
            (body.len() as u64) <= file_size,
            "{tag}: the client got {} bytes of a {file_size}-byte NAR",
            body.len()
        );
        // The upstream connection is dropped soon after the cap, not left running.
        let deadline = Instant::now() + Duration::from_secs(10);
        let sent = loop {
            let log = up.log();
            if let Some(n) = log[before.min(log.len())..]
                .iter()
                .find_map(|l| l.strip_prefix("ENDLESS-SENT "))
            {
                break n.trim().parse::<u64>().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{tag}: the daemon still reads the endless NAR {:?} after it was asked",
                asked.elapsed()
            );
            assert!(
                folder_bytes(&nars) <= file_size + (1 << 20),
                "{tag}: the NAR folder grew to {} bytes for a {file_size}-byte NAR",
                folder_bytes(&nars)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // What sits in socket buffers is sent but never read: a few MiB at most.
        assert!(
            sent <= file_size + (16 << 20),
            "{tag}: the upstream sent {sent} bytes before being cut off ({file_size} expected)"
        );
        assert_eq!(folder_bytes(&nars), 0, "{tag}: nothing unverified is kept");
    }
}

#[test]
fn upstream_narinfos_get_our_signature_only_when_a_trusted_key_verified_them() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let (our_sk, our_pk) = env.keypair("ours-1");
    let dir = nix_cache(&env, "up", &up_sk, "xz", &closure.app);
    let up = PyServer::start(&dir, 0.0);
    let sigs = |daemon: &Daemon| -> Vec<String> {
        let (code, body) = curl(&[&format!("{}/{}.narinfo", daemon.url, digest(&closure.app))]);
        assert_eq!(code, 200);
        String::from_utf8(body)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("Sig: "))
            .map(|s| s.split(':').next().unwrap().to_owned())
            .collect()
    };
    let our_sk = our_sk.to_str().unwrap();
    let unverified = serve_upstream(&env, &up, "nars-a", &["--secret-key-file", our_sk]);
    assert_eq!(
        sigs(&unverified),
        vec!["upstream-1"],
        "passed through, not signed"
    );
    assert!(
        unverified.logged("unsigned by this server"),
        "{:?}",
        unverified.log()
    );
    // A client that trusts only our key gets nothing from it.
    let fresh = env.path("fresh-a");
    let out = env.output(
        "nix-store",
        &[
            "--store",
            fresh.to_str().unwrap(),
            "--realise",
            &closure.app,
            "--option",
            "substituters",
            &unverified.url,
            "--option",
            "trusted-public-keys",
            &our_pk,
        ],
    );
    assert!(!out.status.success(), "nothing signed by our key to trust");

    let verified = serve_upstream(
        &env,
        &up,
        "nars-b",
        &["--trusted-public-key", &up_pk, "--secret-key-file", our_sk],
    );
    let mut got = sigs(&verified);
    got.sort();
    assert_eq!(got, vec!["ours-1", "upstream-1"]);
    let fresh = env.path("fresh-b");
    env.realise_from(
        fresh.to_str().unwrap(),
        &verified.url,
        &our_pk,
        &closure.app,
    );
}
