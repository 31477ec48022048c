//! TLS: the real Nix substitutes over HTTPS, curl negotiates HTTP/2, and SIGHUP swaps the
//! certificate for new connections while a download on an old one completes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream_server::nar_url_with;
use common::{Daemon, NixEnv};

/// Runs openssl, failing the test with its stderr.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl CLI");
    common::assert_succeeded(&out);
}

/// A test CA in `dir` (ca.pem, ca.key).
fn make_ca(dir: &Path) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=nixcached test CA",
        ],
    );
    dir.join("ca.pem")
}

/// A server certificate for 127.0.0.1 and localhost with common name `cn`, signed by the CA
/// in `dir`: (`cn`.pem, `cn`.key).
fn make_cert(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let (key, csr, pem) = (
        format!("{cn}.key"),
        format!("{cn}.csr"),
        format!("{cn}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    (dir.join(pem), dir.join(key))
}

/// curl over TLS trusting `ca`: (HTTP status, HTTP version, the server certificate's subject
/// as curl prints it).
fn curl_tls(ca: &Path, url: &str, extra: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args([
            "-sv",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (code, version) = stdout.split_once(' ').unwrap_or(("0", ""));
    let subject = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("subject: "))
        .unwrap_or("")
        .to_owned();
    (code.parse().unwrap_or(0), version.to_owned(), subject)
}

/// The real Nix substitutes over `https://127.0.0.1:PORT` trusting the test CA; curl
/// negotiates HTTP/2 by ALPN, and HTTP/1.1 still works.
#[test]
fn nix_substitutes_over_https_and_curl_speaks_h2() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("tls-1");
    let ca = make_ca(env.dir.path());
    let (cert, key) = make_cert(env.dir.path(), "one");
    let d = start_tls(
        &env,
        &cert,
        &key,
        &["--secret-key-file", sk.to_str().unwrap()],
    );
    assert!(d.url.starts_with("https://127.0.0.1:"), "{}", d.url);
    let info = format!("{}/nix-cache-info", d.url);
    assert_eq!(
        curl_tls(&ca, &info, &["--http2"]),
        (200, "2".to_owned(), "CN=one".to_owned())
    );
    let (code, version, _) = curl_tls(&ca, &info, &["--http1.1"]);
    assert_eq!((code, version.as_str()), (200, "1.1"));
    // Without the CA the certificate is not trusted: TLS is really in the way.
    let (code, _, _) = curl_tls(Path::new("/dev/null"), &info, &[]);
    assert_eq!(code, 0);

    // Nix 2.8 has no ssl-cert-file setting ("unknown setting"); it reads NIX_SSL_CERT_FILE.
    let realise = |store: &Path, ca: &Path| {
        env.cmd("nix-store")
            .env("NIX_SSL_CERT_FILE", ca)
            .args([
                "--store",
                store.to_str().unwrap(),
                "--realise",
                &closure.app,
            ])
            .args(["--option", "substituters", &d.url])
            .args(["--option", "trusted-public-keys", &pk])
            .output()
            .unwrap()
    };
    // Trusting another CA, Nix refuses the server: the certificate is really checked.
    let other_ca = env.path("other-ca");
    std::fs::create_dir_all(&other_ca).unwrap();
    let refused = env.path("refused");
    let out = realise(&refused, &make_ca(&other_ca));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SSL peer certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sub = env.path("substituted");
    common::assert_succeeded(&realise(&sub, &ca));
    env.verify(sub.to_str().unwrap(), Some(&pk), &closure.app);
}

/// SIGHUP: new connections get the replaced certificate, a download begun before completes
/// intact, and a reload from a bad file keeps the previous certificate serving.
#[test]
fn sighup_reloads_the_certificate_and_keeps_downloads() {
    let env = NixEnv::new();
    let dir = env.dir.path();
    let path = big_path(&env, 6 << 20);
    let ca = make_ca(dir);
    let (one_cert, one_key) = make_cert(dir, "one");
    let (two_cert, two_key) = make_cert(dir, "two");
    let (cert, key) = (env.path("server.pem"), env.path("server.key"));
    std::fs::copy(&one_cert, &cert).unwrap();
    std::fs::copy(&one_key, &key).unwrap();
    let d = start_tls(&env, &cert, &key, &[]);
    let (code, _, subject) = curl_tls(&ca, &format!("{}/nix-cache-info", d.url), &[]);
    assert_eq!((code, subject.as_str()), (200, "CN=one"));

    // A NAR download at 1 MiB/s: about six seconds, across both reloads.
    let nar = nar_url_with(&d, &path, &["--cacert", ca.to_str().unwrap()]);
    let out = env.path("download.nar");
    let mut download = Command::new("curl")
        .args(["-sf", "--limit-rate", "1M", "--http2", "-o"])
        .arg(&out)
        .arg("--cacert")
        .arg(&ca)
        .arg(format!("{}/{nar}", d.url))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        download.try_wait().unwrap().is_none(),
        "download still running"
    );

    std::fs::copy(&two_cert, &cert).unwrap();
    std::fs::copy(&two_key, &key).unwrap();
    hup(&d);
    assert!(d.logged("reloaded TLS certificate"));
    let (code, _, subject) = curl_tls(&ca, &format!("{}/nix-cache-info", d.url), &[]);
    assert_eq!((code, subject.as_str()), (200, "CN=two"), "new connection");

    // A broken certificate file: the reload fails, the previous pair keeps serving.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    hup(&d);
    assert!(d.logged("still serving the previous certificate"));
    let (code, _, subject) = curl_tls(&ca, &format!("{}/nix-cache-info", d.url), &[]);
    assert_eq!(
        (code, subject.as_str()),
        (200, "CN=two"),
        "after a bad reload"
    );
    // The key of another certificate is refused the same way.
    std::fs::copy(&one_cert, &cert).unwrap();
    hup(&d);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d
        .log()
        .iter()
        .filter(|l| l.contains("still serving the previous certificate"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "second failed reload not logged");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d
        .log()
        .iter()
        .any(|l| l.contains("does not belong to certificate")));
    let (_, _, subject) = curl_tls(&ca, &format!("{}/nix-cache-info", d.url), &[]);
    assert_eq!(subject, "CN=two");

    assert!(
        download.try_wait().unwrap().is_none(),
        "the download should outlast the reloads"
    );
    let status = download.wait().unwrap();
    assert!(
        status.success(),
        "download begun before the reload: {status}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), env.dump(&env.real(&path)));
}

/// `serve` of the chroot store over TLS with `extra` flags.
fn start_tls(env: &NixEnv, cert: &Path, key: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "serve",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--no-access-records",
    ];
    args.extend_from_slice(extra);
    let store = env.store_arg();
    args.push(&store);
    Daemon::start(env, &args)
}

fn hup(d: &Daemon) {
    let ok = Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Unreadable or mismatched files stop start-up with the file named and what to give.
#[test]
fn bad_certificate_files_stop_startup() {
    let env = NixEnv::new();
    let dir = env.dir.path();
    make_ca(dir);
    let (one_cert, _) = make_cert(dir, "one");
    let (_, two_key) = make_cert(dir, "two");
    let start = |cert: &Path, key: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_nixcached"))
            .args(["serve", "--listen", "127.0.0.1:0", "--no-access-records"])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg(format!("file://{}", dir.display()))
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let missing = dir.join("missing.pem");
    let e = start(&missing, &two_key);
    assert!(
        e.contains("TLS certificate") && e.contains("missing.pem"),
        "{e}"
    );
    assert!(e.contains("give a PEM file"), "{e}");
    let e = start(&one_cert, &one_cert);
    assert!(e.contains("TLS key") && e.contains("one.pem"), "{e}");
    let e = start(&one_cert, &two_key);
    assert!(
        e.contains("two.key does not belong to certificate") && e.contains("one.pem"),
        "{e}"
    );
}

/// A file of `len` bytes that compress badly, added to the chroot store; returns its path.
fn big_path(env: &NixEnv, len: u32) -> String {
    let big = env.path("big");
    std::fs::create_dir_all(&big).unwrap();
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(big.join("data"), &data).unwrap();
    env.add(&big)
}

/// `--idle-timeout` finds a client that stops reading over TLS and HTTP/2 too (the socket is
/// found under the TLS stream).
#[test]
fn idle_readers_are_dropped_over_tls() {
    let env = NixEnv::new();
    let path = big_path(&env, 24 << 20);
    let ca = make_ca(env.dir.path());
    let (cert, key) = make_cert(env.dir.path(), "one");
    let d = start_tls(&env, &cert, &key, &["--idle-timeout", "2s"]);
    let nar = nar_url_with(&d, &path, &["--cacert", ca.to_str().unwrap()]);
    // curl writes into a pipe nobody reads: once it is full, curl stops reading the socket.
    let mut stalled = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -s --http2 --cacert {} {}/{nar} | sleep 30",
            ca.display(),
            d.url
        ))
        .spawn()
        .unwrap();
    let dropped = d.logged("the client read nothing for 2s; dropping it");
    let _ = stalled.kill();
    let _ = stalled.wait();
    assert!(dropped, "the stalled TLS client was not dropped");
}

/// A config file: `[server]`'s TLS on the shared listener with a private cache under a
/// prefix, and a cache on its own listener with its own certificate.
#[test]
fn config_file_tls_per_listener_with_a_private_cache() {
    let env = NixEnv::new();
    let dir = env.dir.path();
    let ca = make_ca(dir);
    let (one_cert, one_key) = make_cert(dir, "one");
    let (two_cert, two_key) = make_cert(dir, "two");
    let (folder, private) = (env.path("folder"), env.path("private"));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::create_dir_all(&private).unwrap();
    let token = "config-file-test-token";
    let (shared, own) = (common::peers::free_port(), common::peers::free_port());
    let config = env.path("nixcached.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{shared}\"]\naccess-records = false\n\
             tls-cert = \"{}\"\ntls-key = \"{}\"\n\n\
             [[cache]]\nstore = \"file://{}\"\nprefix = \"/team\"\n\
             [[cache.credential]]\ntoken-hash = \"{}\"\nrights = [\"read\"]\n\n\
             [[cache]]\nstore = \"file://{}\"\nlisten = [\"127.0.0.1:{own}\"]\n\
             tls-cert = \"{}\"\ntls-key = \"{}\"\n",
            one_cert.display(),
            one_key.display(),
            private.display(),
            nixcached_actors::http::auth::hash_secret(token),
            folder.display(),
            two_cert.display(),
            two_key.display(),
        ),
    )
    .unwrap();
    let d = Daemon::start_config(&env, &config);
    // Both listeners log before either is known to accept; wait for the second one's line.
    assert!(d.logged(&format!("Listening on https://127.0.0.1:{own}/")));
    assert!(d.logged(&format!("Listening on https://127.0.0.1:{shared}/team/")));
    let team = format!("https://127.0.0.1:{shared}/team/nix-cache-info");
    let (code, version, subject) = curl_tls(&ca, &team, &["--http2"]);
    assert_eq!(
        (code, version.as_str(), subject.as_str()),
        (401, "2", "CN=one")
    );
    let auth = format!("Authorization: Bearer {token}");
    let (code, _, _) = curl_tls(&ca, &team, &["-H", &auth]);
    assert_eq!(code, 200);
    let (code, version, subject) = curl_tls(
        &ca,
        &format!("https://127.0.0.1:{own}/nix-cache-info"),
        &["--http2"],
    );
    assert_eq!(
        (code, version.as_str(), subject.as_str()),
        (200, "2", "CN=two")
    );
}
