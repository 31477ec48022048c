//! TLS: the real Nix substitutes over HTTPS, curl negotiates HTTP/2, and SIGHUP swaps the
//! certificate for new connections while a download on an old one completes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--secret-key-file",
            sk.to_str().unwrap(),
            "--no-access-records",
            &env.store_arg(),
        ],
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
    let big = env.path("big");
    std::fs::create_dir_all(&big).unwrap();
    let data: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(big.join("data"), &data).unwrap();
    let path = env.add(&big);
    let ca = make_ca(dir);
    let (one_cert, one_key) = make_cert(dir, "one");
    let (two_cert, two_key) = make_cert(dir, "two");
    let (cert, key) = (env.path("server.pem"), env.path("server.key"));
    std::fs::copy(&one_cert, &cert).unwrap();
    std::fs::copy(&one_key, &key).unwrap();
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--no-access-records",
            &env.store_arg(),
        ],
    );
    let (code, _, subject) = curl_tls(&ca, &format!("{}/nix-cache-info", d.url), &[]);
    assert_eq!((code, subject.as_str()), (200, "CN=one"));

    // A NAR download at 1 MiB/s: about six seconds, across both reloads.
    let (code, body) = common::curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("{}/{}.narinfo", d.url, &path["/nix/store/".len()..][..32]),
    ]);
    assert_eq!(code, 200);
    let nar = String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
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
