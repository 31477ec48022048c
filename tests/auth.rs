//! Access control: private caches (read credentials), write credentials, the real Nix with a
//! netrc-file, and a private upstream whose credentials go to no other host.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use common::credentials::{bearer, credentials_file, new_credential};
use common::upstream_server::{digest, nar_url, nar_url_with, nix_cache};
use common::{curl, curl_headers, Daemon, NixEnv};

/// Every read route of a private cache needs the read credential; `/healthz` stays open;
/// wrong or missing credentials are 401 with both challenges, a read credential on a write
/// is 403. Only hashes are in the credentials file, and the token is never logged.
#[test]
fn private_cache_answers_by_credential() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (reader, entry) = new_credential(&["--rights", "read"]);
    let creds = credentials_file(&env, "creds.toml", &[&entry]);
    let written = std::fs::read_to_string(&creds).unwrap();
    assert!(!written.contains(&reader), "plain token in {written}");
    assert!(written.contains("token-hash = \"sha256:"), "{written}");
    let d = Daemon::start(&env, &["serve", "--credentials", &creds, &env.store_arg()]);
    let url = &d.url;
    // Without a credential the narinfo is a 401, so its NAR URL is read with one.
    let nar = nar_url_with(&d, &closure.app, &["-H", &bearer(&reader)]);
    let routes = [
        String::new(),
        "nix-cache-info".into(),
        format!("{}.narinfo", digest(&closure.app)),
        format!("{}.ls", digest(&closure.app)),
        nar,
        "metrics".into(),
        "_/style.css".into(),
        format!("{}/browse/", digest(&closure.app)),
    ];
    for r in &routes {
        let target = format!("{url}/{r}");
        let (code, headers) = curl_headers(&[&target]);
        assert_eq!(code, 401, "{target} without a credential");
        let challenges: Vec<_> = headers
            .iter()
            .filter(|(k, _)| k == "www-authenticate")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            challenges,
            ["Basic realm=\"nixcached\"", "Bearer realm=\"nixcached\""],
            "{target}"
        );
        let (code, _) = curl(&["-H", "Authorization: Bearer wrong", &target]);
        assert_eq!(code, 401, "{target} with a wrong token");
        let (code, _) = curl(&["-u", "nixcached:wrong", &target]);
        assert_eq!(code, 401, "{target} with a wrong password");
        let (code, _) = curl(&["-H", &bearer(&reader), &target]);
        assert_eq!(code, 200, "{target} with the read token");
        // What Nix sends from a netrc line carrying the token.
        let (code, _) = curl(&["-u", &format!("nixcached:{reader}"), &target]);
        assert_eq!(code, 200, "{target} with the token as a Basic password");
    }
    let (code, _) = curl(&[&format!("{url}/healthz")]);
    assert_eq!(code, 200, "healthz shows no content and stays open");
    let target = format!("{url}/nar/x.nar");
    let (code, _) = curl(&["-X", "PUT", "-H", &bearer(&reader), "-d", "x", &target]);
    assert_eq!(code, 403, "a read credential may not write");
    let (code, _) = curl(&["-X", "PUT", "-d", "x", &target]);
    assert_eq!(code, 401, "a write without a credential");
    assert!(
        !d.log().iter().any(|l| l.contains(&reader)),
        "the token reached the log"
    );
}

/// A cache with only a write credential stays public for reads; writes need the write
/// credential (and then meet the handlers, which have no upload route yet: 405).
#[test]
fn write_credential_guards_writes_only() {
    let env = NixEnv::new();
    let (writer, entry) = new_credential(&["--rights", "write"]);
    let creds = credentials_file(&env, "creds.toml", &[&entry]);
    let store = env.path("cache");
    std::fs::create_dir_all(&store).unwrap();
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--credentials",
            &creds,
            &format!("file://{}", store.display()),
        ],
    );
    let (code, _) = curl(&[&format!("{}/nix-cache-info", d.url)]);
    assert_eq!(code, 200, "public for reads");
    let target = format!("{}/nar/x.nar", d.url);
    let (code, _) = curl(&["-X", "PUT", "-d", "x", &target]);
    assert_eq!(code, 401);
    let (code, _) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Authorization: Bearer nope",
        "-d",
        "x",
        &target,
    ]);
    assert_eq!(code, 401);
    let (code, _) = curl(&["-X", "PUT", "-H", &bearer(&writer), "-d", "x", &target]);
    assert_eq!(
        code, 405,
        "past the credential check, on to the read-only handlers"
    );
}

/// The real Nix substitutes from a private cache (a Basic user in the config file's
/// `[[cache.credential]]`) with a netrc-file, and substitutes nothing without one.
#[test]
fn nix_substitutes_from_a_private_cache_only_with_a_netrc_file() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("private-1");
    let (password, entry) = new_credential(&["--rights", "read", "--user", "builder"]);
    let port = common::peers::free_port();
    let config = env.path("nixcached.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\naccess-records = false\n\n\
             [[cache]]\nstore = \"{}\"\nsecret-key-files = [\"{}\"]\n{entry}",
            env.store_arg(),
            sk.display()
        ),
    )
    .unwrap();
    assert!(!std::fs::read_to_string(&config)
        .unwrap()
        .contains(&password));
    let _d = Daemon::start_config(&env, &config);
    let url = format!("http://127.0.0.1:{port}");

    // Without credentials Nix cannot use the cache: nothing is substituted.
    let without = env.path("without");
    let out = env.output(
        "nix-store",
        &[
            "--store",
            without.to_str().unwrap(),
            "--realise",
            &closure.app,
            "--option",
            "substituters",
            &url,
            "--option",
            "trusted-public-keys",
            &pk,
        ],
    );
    assert!(!out.status.success(), "substituted without a credential");
    assert!(!without.join(closure.app.trim_start_matches('/')).exists());

    let netrc = env.path("netrc");
    std::fs::write(
        &netrc,
        format!("machine 127.0.0.1 login builder password {password}\n"),
    )
    .unwrap();
    env.set_nix_config(Some(format!("netrc-file = {}", netrc.display())));
    let with = env.path("with");
    env.realise_from(with.to_str().unwrap(), &url, &pk, &closure.app);
    assert!(with
        .join(closure.app.trim_start_matches('/'))
        .join("bin/hi")
        .exists());
    env.verify(with.to_str().unwrap(), Some(&pk), &closure.app);
}

/// A private `serve` as the upstream of another: with `--netrc-file` the second one serves
/// (and Nix substitutes through it); without, the upstream refuses it and it serves nothing.
#[test]
fn private_upstream_through_a_netrc_file() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("upstream-private-1");
    let (token, entry) = new_credential(&["--rights", "read"]);
    let creds = credentials_file(&env, "creds.toml", &[&entry]);
    let upstream = Daemon::start(
        &env,
        &[
            "serve",
            "--credentials",
            &creds,
            "--secret-key-file",
            sk.to_str().unwrap(),
            "--no-access-records",
            &env.store_arg(),
        ],
    );
    let netrc = env.path("netrc");
    std::fs::write(
        &netrc,
        format!("machine 127.0.0.1 login nixcached password {token}\n"),
    )
    .unwrap();
    let front = |netrc_args: &[&str]| {
        let mut args = vec![
            "serve",
            "--upstream",
            &upstream.url,
            "--trusted-public-key",
            &pk,
            "--no-access-records",
            "--nar-cache-size-mib",
            "0",
        ];
        args.extend_from_slice(netrc_args);
        Daemon::start(&env, &args)
    };
    let without = front(&[]);
    let (code, _) = curl(&[&format!("{}/{}.narinfo", without.url, digest(&closure.app))]);
    assert_eq!(code, 404, "served without the upstream's credential");
    drop(without);

    let with = front(&["--netrc-file", netrc.to_str().unwrap()]);
    let (code, _) = curl(&[&format!("{}/{}.narinfo", with.url, digest(&closure.app))]);
    assert_eq!(code, 200);
    let sub = env.path("substituted");
    env.realise_from(sub.to_str().unwrap(), &with.url, &pk, &closure.app);
    env.verify(sub.to_str().unwrap(), Some(&pk), &closure.app);
}

/// A loopback HTTP server that records every request head and answers from `files`
/// (path → reply); unknown paths are 404.
struct Recorder {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
    files: Arc<Mutex<std::collections::HashMap<String, Reply>>>,
}

#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
    Redirect(String),
}

impl Recorder {
    fn start(host: &str) -> Recorder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{host}:{}", listener.local_addr().unwrap().port());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let (h, f) = (heads.clone(), files.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                let (h, f) = (h.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    h.lock().unwrap().push(head);
                    let reply = f.lock().unwrap().get(&path).cloned();
                    let _ = match reply {
                        Some(Reply::Body(b)) => conn
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                    b.len()
                                )
                                .as_bytes(),
                            )
                            .and_then(|_| conn.write_all(&b)),
                        Some(Reply::Redirect(to)) => conn.write_all(
                            format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .as_bytes(),
                        ),
                        None => conn.write_all(
                            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        ),
                    };
                });
            }
        });
        Recorder { url, heads, files }
    }

    fn serve(&self, path: &str, reply: Reply) {
        self.files.lock().unwrap().insert(path.to_owned(), reply);
    }

    /// The recorded heads of requests for paths starting with `prefix`.
    fn heads_for(&self, prefix: &str) -> Vec<String> {
        let needle = format!(" {prefix}");
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.lines().next().is_some_and(|l| l.contains(&needle)))
            .cloned()
            .collect()
    }
}

fn has_authorization(head: &str) -> bool {
    head.lines()
        .any(|l| l.to_ascii_lowercase().starts_with("authorization:"))
}

/// netrc credentials go to the upstream's own host only: not to the host an absolute NAR URL
/// names, nor to the host a NAR redirect leads to (both allowed NAR hosts).
#[test]
fn netrc_credentials_reach_no_other_host() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("netrc-hosts-1");
    let dir = nix_cache(&env, "upstream", &sk, "none", &closure.app);
    let upstream = Recorder::start("127.0.0.1");
    // Another host name for the same loopback: another origin, as a CDN would be.
    let other = Recorder::start("localhost");
    upstream.serve(
        "/nix-cache-info",
        Reply::Body(b"StoreDir: /nix/store\nWantMassQuery: 1\n".to_vec()),
    );
    // app: its narinfo names the NAR by an absolute URL on the other host; lib: its NAR is
    // redirected there.
    for (path, absolute) in [(&closure.app, true), (&closure.lib, false)] {
        let name = format!("{}.narinfo", digest(path));
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        let nar = std::fs::read(dir.join(&rel)).unwrap();
        other.serve(&format!("/{rel}"), Reply::Body(nar));
        let text = if absolute {
            text.replace(&format!("URL: {rel}"), &format!("URL: {}/{rel}", other.url))
        } else {
            upstream.serve(
                &format!("/{rel}"),
                Reply::Redirect(format!("{}/{rel}", other.url)),
            );
            text
        };
        upstream.serve(&format!("/{name}"), Reply::Body(text.into_bytes()));
    }
    let netrc = env.path("netrc");
    std::fs::write(
        &netrc,
        "machine 127.0.0.1 login nixcached password upstream-secret\n",
    )
    .unwrap();
    let d = Daemon::start(
        &env,
        &[
            "serve",
            "--upstream",
            &upstream.url,
            "--upstream-nar-host",
            other.url.trim_start_matches("http://"),
            "--netrc-file",
            netrc.to_str().unwrap(),
            "--trusted-public-key",
            &pk,
            "--no-access-records",
            "--nar-cache-size-mib",
            "0",
        ],
    );
    for path in [&closure.app, &closure.lib] {
        let url = nar_url(&d, path);
        let (code, body) = curl(&[&format!("{}/{url}", d.url)]);
        assert_eq!(code, 200, "NAR of {path}");
        assert!(!body.is_empty());
    }
    let to_upstream = upstream.heads_for("/");
    assert!(
        to_upstream.iter().any(|h| h.contains(".narinfo")),
        "{to_upstream:?}"
    );
    for h in &to_upstream {
        assert!(
            has_authorization(h),
            "upstream request without credentials: {h}"
        );
    }
    let redirected = upstream.heads_for("/nar/");
    // (A HEAD before the GET, or the GET alone: how many does not matter here.)
    assert!(
        !redirected.is_empty(),
        "the redirected NAR was asked for there"
    );
    let to_other = other.heads_for("/nar/");
    assert!(
        to_other.len() >= 2,
        "both NARs came from the other host: {to_other:?}"
    );
    for h in &to_other {
        assert!(
            !has_authorization(h),
            "credentials sent to another host: {h}"
        );
    }
}
