//! `nix copy --to http://…` into a served cache (`serve --allow-push`): the real Nix pushes a
//! closure into file://, s3:// (moto), gs:// (fake-gcs-server) and ssh:// caches, and a fresh
//! Nix substitutes it back with signatures checked; hostile pushes by curl and by a raw socket
//! are refused with a 4xx and leave nothing stored.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::peers::{gcs_bucket, s3_bucket, ssh_url};
use common::{curl, nix32_sha256, Closure, Daemon, NixEnv};

/// The 32-character digest of a store path.
fn digest(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

/// `nixcached serve --allow-push --secret-key-file SK STORE EXTRA…`.
fn serve_pushable(env: &NixEnv, store: &str, sk: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "serve",
        "--allow-push",
        "--secret-key-file",
        sk.to_str().unwrap(),
        "--negative-ttl",
        "1h",
    ];
    args.extend_from_slice(extra);
    args.push(store);
    Daemon::start(env, &args)
}

/// The file:// URL of a cache folder, created empty.
fn file_url(dir: &Path) -> String {
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

/// A cache folder served with pushes allowed, and a closure built to push into it.
struct Bed {
    env: NixEnv,
    closure: Closure,
    /// The cache folder.
    cache: PathBuf,
    d: Daemon,
}

impl Bed {
    /// Serves the folder `cache` (relative to the environment) with `serve --allow-push`,
    /// signing with a key of its own, plus the flags `extra` makes (given the environment).
    fn new(cache: &str, extra: impl FnOnce(&NixEnv) -> Vec<String>) -> Bed {
        let env = NixEnv::new();
        let closure = env.build_closure();
        let (sk, _) = env.keypair("push-1");
        let extra = extra(&env);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let cache = env.path(cache);
        let d = serve_pushable(&env, &file_url(&cache), &sk, &extra);
        Bed {
            env,
            closure,
            cache,
            d,
        }
    }

    /// `curl -X PUT` of `body` to `path` below the server (sent as is, `..` included);
    /// returns the status and the response text.
    fn put(&self, path: &str, body: &[u8]) -> (u16, String) {
        let file = self.env.path("body");
        std::fs::write(&file, body).unwrap();
        let (code, text) = curl(&[
            "--path-as-is",
            "-X",
            "PUT",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{}/{path}", self.d.url),
        ]);
        (code, String::from_utf8_lossy(&text).into_owned())
    }

    /// Pushes a path's NAR and then its narinfo, each expected to be taken.
    fn push(&self, p: &Pushed) {
        let (code, text) = self.put(&p.nar_url, &p.nar);
        assert_eq!(code, 200, "{text}");
        let (code, text) = self.put(&p.narinfo_key, p.narinfo.as_bytes());
        assert_eq!(code, 200, "{text}");
    }

    /// The status of a GET of `path` below the server.
    fn get(&self, path: &str) -> u16 {
        curl(&[&format!("{}/{path}", self.d.url)]).0
    }

    /// Whether the cache folder holds `key`.
    fn holds(&self, key: &str) -> bool {
        self.cache.join(key).exists()
    }

    /// Every file of the cache folder under `nar/`.
    fn nar_files(&self) -> Vec<String> {
        files(&self.cache)
            .into_iter()
            .filter(|f| f.starts_with("nar/"))
            .collect()
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

/// A store path's NAR and the narinfo text Nix would push for it uncompressed.
struct Pushed {
    nar: Vec<u8>,
    nar_url: String,
    /// `<digest>.narinfo`.
    narinfo_key: String,
    narinfo: String,
}

fn uncompressed(env: &NixEnv, path: &str, refs: &[&str]) -> Pushed {
    let nar = env.dump(&env.real(path));
    let hash = nix32_sha256(&nar);
    let nar_url = format!("nar/{}.nar", hash.trim_start_matches("sha256:"));
    let refs: Vec<&str> = refs.iter().map(|r| &r["/nix/store/".len()..]).collect();
    let narinfo = format!(
        "StorePath: {path}\nURL: {nar_url}\nCompression: none\nFileHash: {hash}\nFileSize: {n}\nNarHash: {hash}\nNarSize: {n}\nReferences: {}\n",
        refs.join(" "),
        n = nar.len()
    );
    Pushed {
        nar,
        nar_url,
        narinfo_key: format!("{}.narinfo", digest(path)),
        narinfo,
    }
}

/// `xz -c` of bytes, as Nix compresses NARs by default.
fn xz(data: &[u8], scratch: &Path) -> Vec<u8> {
    let file = scratch.join("to-xz");
    std::fs::write(&file, data).unwrap();
    let out = std::process::Command::new("xz")
        .args(["-c", "-6"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Every file below `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_nar_that_does_not_match_its_narinfo_is_refused_and_nothing_is_stored() {
    let b = Bed::new("cache", |_| Vec::new());
    let dep = uncompressed(&b.env, &b.closure.dep, &[]);
    // A NAR named other than by its hash is refused as it ends: no file appears.
    let wrong_name = format!("nar/{}.nar", &nix32_sha256(b"x")["sha256:".len()..]);
    let (code, text) = b.put(&wrong_name, &dep.nar);
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("name it nar/"), "{text}");
    assert!(b.nar_files().is_empty(), "{:?}", b.nar_files());

    // The NAR is fine, but the narinfo claims other contents.
    let (code, text) = b.put(&dep.nar_url, &dep.nar);
    assert_eq!(code, 200, "{text}");
    let other = nix32_sha256(b"something else");
    // Uncompressed, FileHash and NarHash are one: both lie alike.
    let lying = dep.narinfo.replace(&nix32_sha256(&dep.nar), &other);
    let (code, text) = b.put(&dep.narinfo_key, lying.as_bytes());
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("FileHash"), "{text}");
    // Compressed: the file is what the narinfo says, the NAR inside is not.
    let xz = xz(&dep.nar, b.env.dir.path());
    let file_hash = nix32_sha256(&xz);
    let xz_url = format!("nar/{}.nar.xz", &file_hash["sha256:".len()..]);
    assert_eq!(b.put(&xz_url, &xz).0, 200);
    let lying = format!(
        "StorePath: {}\nURL: {xz_url}\nCompression: xz\nFileHash: {file_hash}\nFileSize: {}\nNarHash: {other}\nNarSize: {}\nReferences: \n",
        b.closure.dep,
        xz.len(),
        dep.nar.len()
    );
    let (code, text) = b.put(&dep.narinfo_key, lying.as_bytes());
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("NarHash"), "{text}");
    let bigger = dep.narinfo.replace(
        &format!("Size: {}", dep.nar.len()),
        &format!("Size: {}", dep.nar.len() + 1),
    );
    let (code, text) = b.put(&dep.narinfo_key, bigger.as_bytes());
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("Size"), "{text}");
    assert!(!b.holds(&dep.narinfo_key));
    assert_eq!(b.get(&dep.narinfo_key), 404);

    // A narinfo before its NAR: 409, and it says what to do.
    let lib = uncompressed(&b.env, &b.closure.lib, &[&b.closure.dep]);
    let (code, text) = b.put(&lib.narinfo_key, lib.narinfo.as_bytes());
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("push the NAR first"), "{text}");
}

#[test]
fn a_narinfo_whose_reference_is_absent_is_refused() {
    let b = Bed::new("cache", |_| Vec::new());
    let lib = uncompressed(&b.env, &b.closure.lib, &[&b.closure.dep]);
    let (code, text) = b.put(&lib.nar_url, &lib.nar);
    assert_eq!(code, 200, "{text}");
    let (code, text) = b.put(&lib.narinfo_key, lib.narinfo.as_bytes());
    assert_eq!(code, 409, "{text}");
    assert!(text.contains(&b.closure.dep[11..]), "{text}");
    assert!(text.contains("push references first"), "{text}");
    assert!(!b.holds(&lib.narinfo_key));

    // Once the reference is there, the same narinfo is taken.
    b.push(&uncompressed(&b.env, &b.closure.dep, &[]));
    let (code, text) = b.put(&lib.narinfo_key, lib.narinfo.as_bytes());
    assert_eq!(code, 200, "{text}");
    assert!(b.holds(&lib.narinfo_key));
}

#[test]
fn nar_urls_of_other_shapes_are_refused_and_nothing_is_written_outside() {
    let b = Bed::new("outer/cache", |_| Vec::new());
    let outer = b.env.path("outer");
    let before = files(&outer);
    let dep = uncompressed(&b.env, &b.closure.dep, &[]);
    let hash = &dep.nar_url[4..56];
    for path in [
        "../x".to_owned(),
        "nar/../../etc".to_owned(),
        format!("nar/../../{hash}.nar"),
        format!("../{hash}.nar"),
        format!("nar/sub/{hash}.nar"),
        format!("x/{hash}.nar"),
        format!("nar/{hash}.rar"),
        format!("nar/{hash}.nar.xz.sh"),
    ] {
        let (code, text) = b.put(&path, &dep.nar);
        assert!((400..500).contains(&code), "{path}: {code} {text}");
    }
    // Narinfos whose URL points elsewhere.
    assert_eq!(b.put(&dep.nar_url, &dep.nar).0, 200);
    for url in [
        format!("http://evil.example/{}", dep.nar_url),
        format!("/{}", dep.nar_url),
        format!("nar/../../{hash}.nar"),
        format!("{}/../../x.nar", b.cache.display()),
    ] {
        let text = dep.narinfo.replace(&dep.nar_url, &url);
        let (code, body) = b.put(&dep.narinfo_key, text.as_bytes());
        assert!((400..500).contains(&code), "{url}: {code} {body}");
    }
    let mut want = before;
    want.extend([
        "cache/nix-cache-info".to_owned(),
        format!("cache/{}", dep.nar_url),
    ]);
    want.sort();
    assert_eq!(files(&outer), want);
}

/// Sends a request whose body ends before its Content-Length, then closes the connection.
fn short_body(base: &str, path: &str, declared: usize, sent: &[u8]) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {declared}\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    // The server answers the expectation before any of the body is sent.
    let mut continued = [0u8; 25];
    s.read_exact(&mut continued).unwrap();
    assert!(
        String::from_utf8_lossy(&continued).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&continued)
    );
    s.write_all(sent).unwrap();
    s.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(s);
}

#[test]
fn an_upload_cut_short_leaves_no_nar() {
    let b = Bed::new("cache", |_| Vec::new());
    let app = uncompressed(&b.env, &b.closure.app, &[]);
    short_body(
        &b.d.url,
        &app.nar_url,
        app.nar.len(),
        &app.nar[..app.nar.len() / 2],
    );
    // The server notices the closed connection, fails the write and removes the temporary.
    assert!(b.d.logged("broke off"), "{:?}", b.d.log());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(b.nar_files().is_empty(), "{:?}", b.nar_files());
    assert_eq!(b.get(&app.nar_url), 404);

    // curl killed in the middle of a body it streams slowly.
    let slow = b.env.path("slow");
    std::fs::write(&slow, &app.nar).unwrap();
    let mut child = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-X",
            "PUT",
            "--limit-rate",
            "50K",
            "-T",
        ])
        .arg(&slow)
        .arg(format!("{}/{}", b.d.url, app.nar_url))
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(b.nar_files().is_empty(), "{:?}", b.nar_files());
}

#[test]
fn without_allow_push_a_put_is_405_and_nothing_is_written() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let cache = env.path("cache");
    let d = Daemon::start(&env, &["serve", &file_url(&cache)]);
    let dep = uncompressed(&env, &closure.dep, &[]);
    let (code, text) = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        "@/dev/null",
        &format!("{}/{}", d.url, dep.nar_url),
    ]);
    let text = String::from_utf8_lossy(&text);
    assert_eq!(code, 405, "{text}");
    assert!(text.contains("--allow-push"), "{text}");
    let to = d.url.clone();
    let out = env.output(
        "nix",
        &[
            "copy",
            "--from",
            &env.store_arg(),
            "--to",
            &to,
            &closure.dep,
        ],
    );
    assert!(!out.status.success());
    assert!(files(&cache).is_empty(), "{:?}", files(&cache));
}

#[test]
fn the_local_store_cannot_be_served_for_pushes() {
    let env = NixEnv::new();
    let out = env.output(
        env!("CARGO_BIN_EXE_nixcached"),
        &[
            "serve",
            "--allow-push",
            "--listen",
            "127.0.0.1:0",
            &env.store_arg(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("local Nix store cannot take pushes"), "{err}");
}

#[test]
fn with_push_trusted_keys_an_unsigned_narinfo_is_403() {
    let b = Bed::new("cache", |env| {
        let (_, pk) = env.keypair("pusher-1");
        vec!["--push-trusted-key".into(), pk]
    });
    let dep = uncompressed(&b.env, &b.closure.dep, &[]);
    assert_eq!(b.put(&dep.nar_url, &dep.nar).0, 200);
    let (code, text) = b.put(&dep.narinfo_key, dep.narinfo.as_bytes());
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("pusher-1"), "{text}");
    assert!(!b.holds(&dep.narinfo_key));
    // The real Nix is refused the same way; signed by the trusted key, the closure goes in.
    let (env, to) = (&b.env, b.d.url.clone());
    let copy = [
        "copy",
        "--from",
        &env.store_arg(),
        "--to",
        &to,
        &b.closure.app,
    ];
    assert!(!env.output("nix", &copy).status.success());
    let sk = env.path("pusher-1.sk");
    env.run(
        "nix",
        &[
            "store",
            "sign",
            "--store",
            &env.store_arg(),
            "-k",
            sk.to_str().unwrap(),
            "-r",
            &b.closure.app,
        ],
    );
    env.run("nix", &copy);
    assert_eq!(b.get(&dep.narinfo_key), 200);
}
