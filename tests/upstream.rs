//! Upstream binary caches behind `serve`: real HTTP servers (Python's) serving folders the
//! real Nix filled, and a real Nix client substituting through nixcached.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::upstream_server::{digest, nar_url, nix_cache, PyServer};
use common::{curl, Daemon, NixEnv};

#[test]
fn failover_to_the_second_upstream_when_the_first_stops() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let (our_sk, our_pk) = env.keypair("nixcached-1");
    let mut a = PyServer::start(&nix_cache(&env, "a", &up_sk, "xz", &closure.app), 0.0);
    let b = PyServer::start(&nix_cache(&env, "b", &up_sk, "xz", &closure.app), 0.0);
    // An empty folder cache in front: everything comes from the upstreams.
    let primary = format!("file://{}?create_dir=1", env.path("primary").display());
    let daemon = Daemon::start(
        &env,
        &[
            "serve",
            "--upstream",
            &a.url,
            "--upstream",
            &b.url,
            "--trusted-public-key",
            &up_pk,
            "--secret-key-file",
            our_sk.to_str().unwrap(),
            // Generous: only a loaded machine makes A this slow, and then B would be asked.
            "--upstream-timeout",
            "10s",
            "--nar-cache-dir",
            env.path("nars").to_str().unwrap(),
            &primary,
        ],
    );
    // The client trusts only our key: it checks the signature nixcached adds after it
    // verified the upstream's.
    let fresh = env.path("fresh");
    let fresh = fresh.to_str().unwrap();
    env.realise_from(fresh, &daemon.url, &our_pk, &closure.dep);
    assert_eq!(
        a.count_at_least(&format!("GET /{}.narinfo", digest(&closure.dep)), 1),
        1
    );
    assert_eq!(
        b.settled_count("GET /"),
        0,
        "B is not asked while A answers"
    );

    a.stop();
    env.realise_from(fresh, &daemon.url, &our_pk, &closure.app);
    env.verify(fresh, Some(&our_pk), &closure.app);
    for p in [&closure.app, &closure.lib] {
        assert_eq!(
            b.count_at_least(&format!("GET /{}.narinfo", digest(p)), 1),
            1,
            "{p} from B"
        );
    }
    // Two narinfo lookups above failed on A; one more failure in a row trips its breaker.
    for missing in [
        "00000000000000000000000000000000",
        "11111111111111111111111111111111",
    ] {
        let (code, _) = curl(&[&format!("{}/{missing}.narinfo", daemon.url)]);
        assert_eq!(code, 404, "a miss is a 404 even with an upstream down");
    }
    assert!(
        daemon.logged("skipping it for"),
        "the stopped upstream is skipped after repeated failures: {:?}",
        daemon.log()
    );
}

#[test]
fn a_nar_fetched_once_is_served_from_the_disk_cache_after_the_upstream_is_gone() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let dir = nix_cache(&env, "a", &up_sk, "xz", &closure.app);
    let mut a = PyServer::start(&dir, 0.0);
    let nars = env.path("nars");
    let upstream = a.url.clone();
    let args = [
        "serve",
        "--trusted-public-key",
        &up_pk,
        "--nar-cache-dir",
        nars.to_str().unwrap(),
        &upstream,
    ];
    let daemon = Daemon::start(&env, &args);
    let url = nar_url(&daemon, &closure.lib);
    let expected = std::fs::read(dir.join(&url)).unwrap();
    let (code, first) = curl(&[&format!("{}/{url}", daemon.url)]);
    assert_eq!(code, 200);
    assert_eq!(first, expected);

    a.stop();
    let (code, second) = curl(&[&format!("{}/{url}", daemon.url)]);
    assert_eq!(code, 200, "served without the upstream");
    assert_eq!(second, expected);
    // A range of it, for resumed downloads.
    let (code, part) = curl(&["-r", "3-9", &format!("{}/{url}", daemon.url)]);
    assert_eq!((code, &part[..]), (206, &expected[3..10]));
    // And after a restart: the folder is indexed again.
    drop(daemon);
    let daemon = Daemon::start(&env, &args);
    let (code, third) = curl(&[&format!("{}/{url}", daemon.url)]);
    assert_eq!(code, 200, "served from the folder after a restart");
    assert_eq!(third, expected);
    assert_eq!(
        a.count_at_least(&format!("GET /{url}"), 1),
        1,
        "one upstream GET of the NAR"
    );
}

/// `serve URL` with one upstream trusted by `pk` and a private NAR cache folder.
fn serve_one_upstream(env: &NixEnv, pk: &str, url: &str) -> Daemon {
    Daemon::start(
        env,
        &[
            "serve",
            "--trusted-public-key",
            pk,
            "--nar-cache-dir",
            env.path("nars").to_str().unwrap(),
            url,
        ],
    )
}

#[test]
fn a_narinfo_not_signed_by_a_trusted_key_is_refused() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let (_, other_pk) = env.keypair("someone-else");
    let a = PyServer::start(&nix_cache(&env, "a", &up_sk, "xz", &closure.app), 0.0);
    let daemon = serve_one_upstream(&env, &other_pk, &a.url);
    let (code, _) = curl(&[&format!("{}/{}.narinfo", daemon.url, digest(&closure.dep))]);
    assert_eq!(code, 404);
    assert_eq!(
        a.count_at_least(&format!("GET /{}.narinfo", digest(&closure.dep)), 1),
        1
    );
    let fresh = env.path("fresh");
    let out = env.output(
        "nix-store",
        &[
            "--store",
            fresh.to_str().unwrap(),
            "--realise",
            &closure.dep,
            "--option",
            "substituters",
            &daemon.url,
            "--option",
            "trusted-public-keys",
            &up_pk,
        ],
    );
    assert!(!out.status.success(), "nothing to substitute");
    assert_eq!(a.settled_count("GET /nar/"), 0, "no NAR was fetched");
    assert!(
        daemon.logged("is not signed by a trusted key"),
        "{:?}",
        daemon.log()
    );
}

#[test]
fn concurrent_requests_for_one_uncached_nar_share_one_upstream_fetch() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    // Uncompressed, so the NAR of `dep` (70 kB of data) takes several slow pieces.
    let dir = nix_cache(&env, "a", &up_sk, "none", &closure.dep);
    let a = PyServer::start(&dir, 0.3);
    let daemon = serve_one_upstream(&env, &up_pk, &a.url);
    let url = nar_url(&daemon, &closure.dep);
    let expected = std::fs::read(dir.join(&url)).unwrap();
    assert!(
        expected.len() > 4 * 16384,
        "several pieces: {}",
        expected.len()
    );
    // One download alone, from a second server as slow as A (A's GETs are counted below).
    let solo = PyServer::start(&dir, 0.3);
    let t = Instant::now();
    let (code, body) = curl(&[&format!("{}/{url}", solo.url)]);
    let single = t.elapsed();
    assert!(code == 200 && body == expected, "the single download");
    assert!(
        single > Duration::from_millis(900),
        "the fetch is slow enough for the requests to overlap: {single:?}"
    );

    let started = Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let u = format!("{}/{url}", daemon.url);
            std::thread::spawn(move || {
                // The body, then the seconds to the first byte on a line of its own.
                let out = std::process::Command::new("curl")
                    .args(["-s", "-f", "-o", "-", "-w", "\n%{time_starttransfer}", &u])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{u}: {}", out.status);
                let mut body = out.stdout;
                let nl = body.iter().rposition(|&b| b == b'\n').unwrap();
                let ttfb: f64 = String::from_utf8_lossy(&body[nl + 1..])
                    .trim()
                    .parse()
                    .unwrap();
                body.truncate(nl);
                // Curl's own clock: a busy machine may be slow to start 16 processes.
                (body, Duration::from_secs_f64(ttfb), started.elapsed())
            })
        })
        .collect();
    let (mut slowest, mut longest_wait) = (Duration::ZERO, Duration::ZERO);
    for c in clients {
        let (body, first_byte, took) = c.join().unwrap();
        assert!(body == expected, "every client gets the whole NAR");
        slowest = slowest.max(took);
        longest_wait = longest_wait.max(first_byte);
    }
    eprintln!(
        "one download alone: {single:?}; 16 clients through nixcached: {slowest:?}, \
         the longest wait for a first byte {longest_wait:?}"
    );
    // Sharing means the clients ride along with one download, not queue behind one another
    // (nor behind the first, to be served from the disk cache once it is done).
    assert!(
        slowest < single * 3 / 2,
        "16 clients took {slowest:?}, one download alone {single:?}"
    );
    assert!(
        longest_wait < single / 2,
        "a client waited {longest_wait:?} for its first byte; the download takes {single:?}"
    );
    assert_eq!(
        a.count_at_least(&format!("GET /{url}"), 1),
        1,
        "one upstream GET for 16 clients"
    );
}

#[test]
fn a_client_receives_the_first_bytes_before_the_upstream_finished() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    let dir = nix_cache(&env, "a", &up_sk, "none", &closure.dep);
    let a = PyServer::start(&dir, 1.0);
    let daemon = serve_one_upstream(&env, &up_pk, &a.url);
    let url = nar_url(&daemon, &closure.dep);
    let expected = std::fs::read(dir.join(&url)).unwrap();
    let pieces = expected.len().div_ceil(16384);
    assert!(pieces >= 4, "{pieces} pieces");

    // A raw HTTP/1.1 client, to see when the bytes arrive.
    let addr = daemon.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET /{url} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let asked = Instant::now();
    let mut got = Vec::new();
    let mut first_body_byte = None;
    let mut buf = [0u8; 65536];
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if first_body_byte.is_none() {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if got.len() > end + 4 {
                    first_body_byte = Some(asked.elapsed());
                }
            }
        }
    }
    let finished = asked.elapsed();
    let first = first_body_byte.expect("a body");
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got[..end])
    );
    assert!(got[end + 4..] == expected[..], "the whole NAR");
    // The upstream pauses 1 s after each piece: the whole takes about `pieces` seconds, the
    // first piece reaches the client after about one.
    assert!(
        finished >= Duration::from_secs(pieces as u64 - 1),
        "finished after {finished:?}"
    );
    assert!(
        first + Duration::from_secs(2) < finished,
        "first body byte after {first:?}, last after {finished:?}"
    );
}

#[test]
fn a_silent_upstream_times_out_and_the_next_one_answers() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (up_sk, up_pk) = env.keypair("upstream-1");
    // Accepts connections (the kernel's backlog does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let b = PyServer::start(&nix_cache(&env, "b", &up_sk, "xz", &closure.app), 0.0);
    let daemon = Daemon::start(
        &env,
        &[
            "serve",
            "--upstream",
            &silent_url,
            "--upstream",
            &b.url,
            "--trusted-public-key",
            &up_pk,
            "--upstream-timeout",
            "1s",
            "--nar-cache-dir",
            env.path("nars").to_str().unwrap(),
        ],
    );
    let asked = Instant::now();
    let (code, _) = curl(&[&format!("{}/{}.narinfo", daemon.url, digest(&closure.dep))]);
    assert_eq!(code, 200, "answered by the second upstream");
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "after about one timeout: {:?}",
        asked.elapsed()
    );
    let (code, _) = curl(&[&format!(
        "{}/00000000000000000000000000000000.narinfo",
        daemon.url
    )]);
    assert_eq!(
        code, 404,
        "a miss with one upstream silent is a 404, not a 5xx"
    );
    let fresh = env.path("fresh");
    env.realise_from(fresh.to_str().unwrap(), &daemon.url, &up_pk, &closure.app);
    assert!(daemon.logged("no answer within 1s"), "{:?}", daemon.log());
}
