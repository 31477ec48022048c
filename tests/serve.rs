//! `nixcached serve` as a real process, used by the real Nix client and by curl.

mod common;

use std::fs;

use common::{curl, curl_headers, Daemon, NixEnv};

fn digest(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

#[test]
fn nix_copies_substitutes_and_lists_from_the_local_store() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("serve-local-1");
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &env.store_arg(),
        ],
    );

    let (code, info) = curl(&[&format!("{}/nix-cache-info", d.url)]);
    assert_eq!(code, 200);
    assert_eq!(
        String::from_utf8(info).unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\n"
    );

    // nix copy with signature checking on.
    let fresh = env.path("fresh");
    env.copy_from(&d.url, fresh.to_str().unwrap(), Some(&*pk), &closure.app);
    for p in &closure.paths {
        assert!(fresh.join(p.trim_start_matches('/')).exists(), "{p} copied");
    }

    // Substitution into another store, with the daemon as the only substituter.
    let sub = env.path("substituted");
    env.realise_from(sub.to_str().unwrap(), &d.url, &pk, &closure.app);
    assert!(sub
        .join(closure.app.trim_start_matches('/'))
        .join("bin/hi")
        .exists());

    // Without the key the same copy is refused: signatures are really checked.
    let out = env.output(
        "nix",
        &[
            "copy",
            "--from",
            &d.url,
            "--to",
            env.path("unsigned").to_str().unwrap(),
            &closure.app,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "copy without trusted key must fail");
    // Refused for the signature, not for any failure to reach the daemon.
    assert!(stderr.contains("lacks a valid signature"), "{stderr}");

    // nix store ls lists files through the daemon.
    let ls = env.run(
        "nix",
        &["store", "ls", "--store", &d.url, "-R", &closure.app],
    );
    assert!(ls.contains("./bin/hi"), "{ls}");
    assert!(ls.contains("./random"), "{ls}");
}

#[test]
fn nix_copies_through_folder_caches_in_each_compression() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("folder-1");
    for comp in ["zstd", "xz", "none"] {
        let dir = env.path(&format!("cache-{comp}"));
        env.copy_to(
            &format!(
                "file://{}?compression={comp}&secret-key={}",
                dir.display(),
                sk.display()
            ),
            &[&closure.app],
        );
        let d = Daemon::start(&env, &["serve", &format!("file://{}", dir.display())]);
        let fresh = env.path(&format!("fresh-{comp}"));
        env.copy_from(&d.url, fresh.to_str().unwrap(), Some(&*pk), &closure.app);
        let sub = env.path(&format!("sub-{comp}"));
        env.realise_from(sub.to_str().unwrap(), &d.url, &pk, &closure.app);
        // The served narinfo is byte-identical to the stored one (no signing key given).
        let (code, body) = curl(&[&format!("{}/{}.narinfo", d.url, digest(&closure.app))]);
        assert_eq!(code, 200);
        assert_eq!(
            body,
            fs::read(dir.join(format!("{}.narinfo", digest(&closure.app)))).unwrap()
        );
    }
}

#[test]
fn ranges_resume_and_conditional_requests() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let d = Daemon::start(&env, &["serve", &env.store_arg()]);
    let url = format!("{}/nar/{}.nar", d.url, digest(&closure.app));
    let (code, full) = curl(&[&url]);
    assert_eq!(code, 200);
    assert!(full.len() > 300_000);

    // An interrupted download resumed with Range gives identical bytes.
    let part = env.path("partial");
    fs::write(&part, &full[..123_457]).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-C",
            "-",
            "-o",
            part.to_str().unwrap(),
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "206");
    assert!(fs::read(&part).unwrap() == full);

    let (code, headers) = curl_headers(&["-H", "Range: bytes=100-199", &url]);
    assert_eq!(code, 206);
    let get =
        |h: &[(String, String)], k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(
        get(&headers, "content-range").unwrap(),
        format!("bytes 100-199/{}", full.len())
    );
    assert_eq!(get(&headers, "content-length").unwrap(), "100");
    assert!(get(&headers, "content-encoding").is_none());
    let (_, tail) = curl(&["-H", "Range: bytes=-10", &url]);
    assert!(tail == full[full.len() - 10..]);
    let (code, headers) = curl_headers(&["-H", &format!("Range: bytes={}-", full.len() + 5), &url]);
    assert_eq!(code, 416);
    assert_eq!(
        get(&headers, "content-range").unwrap(),
        format!("bytes */{}", full.len())
    );

    // HEAD gives the length without a body; ETag revalidation gives 304.
    let (code, headers) = curl_headers(&["-I", &url]);
    assert_eq!(code, 200);
    assert_eq!(
        get(&headers, "content-length").unwrap(),
        full.len().to_string()
    );
    let etag = get(&headers, "etag").unwrap();
    let (code, _) = curl_headers(&["-H", &format!("If-None-Match: {etag}"), &url]);
    assert_eq!(code, 304);
    let ni = format!("{}/{}.narinfo", d.url, digest(&closure.app));
    let (_, h) = curl_headers(&[&ni]);
    let (code, _) = curl_headers(&[
        "-H",
        &format!("If-None-Match: {}", get(&h, "etag").unwrap()),
        &ni,
    ]);
    assert_eq!(code, 304);
}

#[test]
fn errors_methods_and_traversal() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let d = Daemon::start(&env, &["serve", &env.store_arg()]);
    let missing = format!("{}/00000000000000000000000000000000.narinfo", d.url);
    let (code, body) = curl(&[&missing]);
    assert_eq!(code, 404);
    assert_eq!(body, b"404 not found\n");
    let (code, _) = curl(&[&format!(
        "{}/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo",
        d.url
    )]);
    assert_eq!(code, 400);
    let (code, headers) = curl_headers(&[
        "-X",
        "PUT",
        "--data",
        "x",
        &format!("{}/{}.narinfo", d.url, digest(&closure.app)),
    ]);
    assert_eq!(code, 405);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "allow" && v.contains("GET")));
    for evil in [
        "/nar/../../../../etc/passwd",
        "/../../etc/passwd",
        "/nar/%2e%2e/%2e%2e/etc/passwd",
        "/log/../../etc/passwd",
    ] {
        let (code, body) = curl(&["--path-as-is", &format!("{}{evil}", d.url)]);
        assert!(code == 404 || code == 400, "{evil}: {code}");
        assert!(
            !String::from_utf8_lossy(&body).contains("root:"),
            "{evil} leaked a file"
        );
    }
    // The HTML view escapes and links references.
    let (code, html) = curl(&[
        "-H",
        "Accept: text/html,*/*;q=0.8",
        &format!("{}/{}.narinfo", d.url, digest(&closure.app)),
    ]);
    assert_eq!(code, 200);
    let html = String::from_utf8(html).unwrap();
    assert!(
        html.contains(&format!("href=\"/{}.narinfo\"", digest(&closure.lib))),
        "{html}"
    );
    let (code, _) = curl(&[&format!("{}/healthz", d.url)]);
    assert_eq!(code, 200);
    assert!(d.metric("nixcached_backend_narinfo_fetches_total") >= 1);
}

#[test]
fn two_hundred_concurrent_misses_make_one_backend_fetch() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let d = Daemon::start(&env, &["serve", &env.store_arg()]);
    let url = format!("{}/{}.narinfo", d.url, digest(&closure.lib));
    let config = env.path("curl.cfg");
    let mut cfg = String::new();
    for i in 0..200 {
        cfg.push_str(&format!(
            "url = \"{url}\"\noutput = \"{}\"\n",
            env.path(&format!("o{i}")).display()
        ));
    }
    fs::write(&config, cfg).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "200",
            "-w",
            "%{http_code}\n",
            "-K",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let codes = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        200,
        "{codes}"
    );
    assert_eq!(d.metric("nixcached_backend_narinfo_fetches_total"), 1);
    let first = fs::read(env.path("o0")).unwrap();
    for i in 1..200 {
        assert_eq!(fs::read(env.path(&format!("o{i}"))).unwrap(), first);
    }
}

#[test]
fn one_gib_nar_streams_in_bounded_memory() {
    let env = NixEnv::new();
    let big = env.path("big/data");
    fs::create_dir_all(big.parent().unwrap()).unwrap();
    let f = fs::File::create(&big).unwrap();
    f.set_len(1024 * 1024 * 1024 + 17).unwrap();
    drop(f);
    let sp = env.add(big.parent().unwrap());
    let d = Daemon::start(&env, &["serve", &env.store_arg()]);
    let url = format!("{}/nar/{}.nar", d.url, digest(&sp));
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &url,
        ])
        .output()
        .unwrap();
    let res = String::from_utf8(out.stdout).unwrap();
    let (code, size) = res.split_once(' ').unwrap();
    assert_eq!(code, "200");
    assert!(size.parse::<u64>().unwrap() > 1024 * 1024 * 1024);
    let peak = d.peak_rss_kib();
    eprintln!("peak RSS serving a 1 GiB NAR: {} MiB", peak / 1024);
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn stop_signals_exit_zero() {
    let env = NixEnv::new();
    let dir = env.path("empty-cache");
    for sig in ["TERM", "INT", "HUP"] {
        let d = Daemon::start(
            &env,
            &["serve", &format!("file://{}?create_dir=1", dir.display())],
        );
        let status = d.signal_and_wait(sig);
        assert!(status.success(), "SIG{sig}: {status}");
    }
}

#[test]
fn transparent_zstd_only_for_clients_that_ask_and_never_for_ranges() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("serve-zstd-1");
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--transparent-zstd",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &env.store_arg(),
        ],
    );
    // `dep` holds 70 kB of one repeated byte: it must shrink.
    let url = format!("{}/nar/{}.nar", d.url, digest(&closure.dep));
    let nar = env.dump(&env.real(&closure.dep));
    let get =
        |h: &[(String, String)], k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());

    // A client that does not ask gets the plain NAR with its length.
    let (code, headers) = curl_headers(&[&url]);
    assert_eq!(code, 200);
    assert!(get(&headers, "content-encoding").is_none());
    assert_eq!(get(&headers, "vary").as_deref(), Some("Accept-Encoding"));
    let (_, plain) = curl(&[&url]);
    assert!(plain == nar, "plain NAR differs from nix-store --dump");
    assert_eq!(d.metric("nixcached_nar_zstd_encoded_total"), 0);

    // curl --compressed asks for zstd (among others), gets it, and decodes the same bytes.
    let (code, headers) = curl_headers(&["-H", "Accept-Encoding: zstd", &url]);
    assert_eq!(code, 200);
    assert_eq!(get(&headers, "content-encoding").as_deref(), Some("zstd"));
    assert!(get(&headers, "content-length").is_none());
    let (code, raw) = curl(&["-H", "Accept-Encoding: zstd", &url]);
    assert_eq!(code, 200);
    assert!(
        raw.len() < nar.len(),
        "encoded {} >= plain {}",
        raw.len(),
        nar.len()
    );
    assert_eq!(&raw[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    let (_, decoded) = curl(&["--compressed", &url]);
    assert!(decoded == nar, "decoded NAR differs from nix-store --dump");
    assert_eq!(d.metric("nixcached_nar_zstd_encoded_total"), 3);

    // Ranges are about the plain bytes: never encoded.
    let (code, headers) = curl_headers(&[
        "-H",
        "Accept-Encoding: zstd",
        "-H",
        "Range: bytes=0-99",
        &url,
    ]);
    assert_eq!(code, 206);
    assert!(get(&headers, "content-encoding").is_none());
    let (_, head) = curl(&[
        "-H",
        "Accept-Encoding: zstd, gzip;q=0",
        "-H",
        "Range: bytes=0-99",
        &url,
    ]);
    assert!(head == nar[..100]);
    // zstd;q=0 means "not zstd".
    let (_, headers) = curl_headers(&["-H", "Accept-Encoding: zstd;q=0", &url]);
    assert!(get(&headers, "content-encoding").is_none());

    // The real Nix client copies the closure with the option on, signatures checked. (Debian's
    // Nix 2.8 does not send `Accept-Encoding: zstd`, so it gets plain NARs; Nix 2.26, which
    // asks, is in tests/modern_nix.rs.)
    let fresh = env.path("fresh");
    env.copy_from(&d.url, fresh.to_str().unwrap(), Some(&*pk), &closure.app);
    env.verify(fresh.to_str().unwrap(), Some(&*pk), &closure.app);
    eprintln!(
        "NAR responses zstd-encoded after nix copy: {}",
        d.metric("nixcached_nar_zstd_encoded_total")
    );
}

/// `<digest>.ls` served from the local store, from a cache `nixcached upload` wrote and from
/// a cache Nix wrote is, parsed, the listing the real Nix writes with `write-nar-listing`.
#[test]
fn nar_listings_are_the_ones_nix_writes() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let by_nix = env.path("nix-cache");
    env.copy_to(
        &format!("file://{}?write-nar-listing=true", by_nix.display()),
        &[&closure.app],
    );
    let paths = env.path("paths");
    fs::write(&paths, closure.paths.join("\n") + "\n").unwrap();
    let ours = env.path("our-cache");
    let out = env
        .cmd(env!("CARGO_BIN_EXE_nixcached"))
        .args(["upload", "--input", paths.to_str().unwrap(), "--state-dir"])
        .arg(env.path("state"))
        .args(["--from", &format!("local?root={}", env.store_arg())])
        .arg(format!("file://{}", ours.display()))
        .output()
        .unwrap();
    common::assert_succeeded(&out);

    let parse = |what: &str, bytes: &[u8]| -> serde_json::Value {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(bytes)))
    };
    let servers = [
        ("local store", env.store_arg()),
        (
            "cache by nixcached upload",
            format!("file://{}", ours.display()),
        ),
        ("cache by Nix", format!("file://{}", by_nix.display())),
    ];
    for (what, store) in servers {
        let d = Daemon::start(&env, &["serve", &store]);
        for p in &closure.paths {
            let want_file = by_nix.join(format!("{}.ls", digest(p)));
            let want = parse(
                &format!("Nix's {}", want_file.display()),
                &fs::read(&want_file).unwrap(),
            );
            let (code, body) = curl(&[&format!("{}/{}.ls", d.url, digest(p))]);
            assert_eq!(code, 200, "{what}: {p}.ls");
            let got = parse(&format!("{what}: {p}.ls"), &body);
            assert_eq!(got, want, "{what}: listing of {p}");
        }
    }
}

/// The budget flags size the budgets, as `/metrics` reports them, and a budget of no slots
/// (which would make every request of its kind wait forever) is refused at start, naming the
/// flag.
#[test]
fn budget_flags_size_the_budgets() {
    let env = NixEnv::new();
    let dir = env.path("cache");
    fs::create_dir_all(&dir).unwrap();
    let store = format!("file://{}", dir.display());
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--metadata-slots",
            "3",
            "--nar-slots",
            "5",
            "--explorer-slots",
            "2",
            &store,
        ],
    );
    let (code, body) = curl(&[&format!("{}/metrics", d.url)]);
    assert_eq!(code, 200);
    let body = String::from_utf8(body).unwrap();
    for line in [
        "nixcached_budget_slots{budget=\"metadata\"} 3",
        "nixcached_budget_slots{budget=\"nar_opens\"} 5",
        "nixcached_budget_slots{budget=\"explorer\"} 2",
    ] {
        assert!(body.contains(line), "no {line:?} in\n{body}");
    }
    let out = env.output(
        env!("CARGO_BIN_EXE_nixcached"),
        &[
            "serve",
            "--nar-slots",
            "0",
            "--listen",
            "127.0.0.1:0",
            &store,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nar-slots must be at least 1"), "{err}");
}

/// The landing page gives a nix.conf snippet with this cache's address and the public key it
/// signs with, and the real Nix, configured with exactly that snippet, substitutes from it
/// with signatures checked.
#[test]
fn the_landing_page_gives_a_nix_conf_snippet_that_works() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("landing-1");
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &env.store_arg(),
        ],
    );
    let (code, body) = curl(&["-H", "Accept: text/html", &format!("{}/", d.url)]);
    assert_eq!(code, 200);
    let html = String::from_utf8(body).unwrap();
    let snippet = html
        .split("<pre id=\"nix-conf\">")
        .nth(1)
        .and_then(|r| r.split("</pre>").next())
        .unwrap_or_else(|| panic!("no snippet: {html}"));
    let conf: std::collections::BTreeMap<&str, &str> = snippet
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .collect();
    assert_eq!(conf["extra-substituters"], d.url, "{snippet}");
    assert_eq!(conf["extra-trusted-public-keys"], pk.trim(), "{snippet}");
    assert!(html.contains("class=\"public-key\""), "{html}");

    let to = env.path("sub");
    env.realise_from(
        to.to_str().unwrap(),
        conf["extra-substituters"],
        conf["extra-trusted-public-keys"],
        &closure.app,
    );
    env.verify(to.to_str().unwrap(), Some(pk.trim()), &closure.app);

    // Without a key to sign with, the page says so and the snippet has no key line.
    let d = Daemon::start(&env, &["serve", &env.store_arg()]);
    let (_, body) = curl(&["-H", "Accept: text/html", &format!("{}/", d.url)]);
    let html = String::from_utf8(body).unwrap();
    assert!(html.contains("adds no signature") && !html.contains("extra-trusted-public-keys"));
}
