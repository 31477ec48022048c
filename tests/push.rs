//! `nix copy --to http://…` into a served cache (`serve --allow-push`): the real Nix pushes a
//! closure into file://, s3:// (moto), gs:// (fake-gcs-server) and ssh:// caches, and a fresh
//! Nix substitutes it back with signatures checked; hostile pushes by curl and by a raw socket
//! are refused with a 4xx and leave nothing stored.

mod common;

use std::io::{Read, Write};
use std::path::Path;

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

#[test]
fn a_remembered_miss_is_forgotten_when_the_narinfo_is_pushed() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, _) = env.keypair("push-1");
    let cache = env.path("cache");
    let d = serve_pushable(&env, &file_url(&cache), &sk, &[]);
    let url = format!("{}/{}.narinfo", d.url, digest(&closure.app));
    assert_eq!(curl(&[&url]).0, 404);
    // Remembered as a miss for an hour (--negative-ttl 1h) unless the push says otherwise.
    assert_eq!(curl(&[&url]).0, 404);
    env.copy_to(&d.url, &[&closure.app]);
    assert_eq!(curl(&[&url]).0, 200);
    assert_eq!(curl(&["-I", &url]).0, 200);
}

/// A store path's NAR and the narinfo text Nix would push for it uncompressed.
struct Pushed {
    nar: Vec<u8>,
    nar_url: String,
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

/// `curl -X PUT` of `body` to `url`; returns the status and the response text.
fn put(url: &str, body: &[u8], scratch: &Path) -> (u16, String) {
    let file = scratch.join("body");
    std::fs::write(&file, body).unwrap();
    let (code, text) = curl(&[
        "--path-as-is",
        "-X",
        "PUT",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.display()),
        url,
    ]);
    (code, String::from_utf8_lossy(&text).into_owned())
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
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, _) = env.keypair("push-1");
    let cache = env.path("cache");
    let d = serve_pushable(&env, &file_url(&cache), &sk, &[]);
    let dep = uncompressed(&env, &closure.dep, &[]);
    // A NAR named other than by its hash is refused as it ends: no file appears.
    let wrong_name = format!("nar/{}.nar", &nix32_sha256(b"x")["sha256:".len()..]);
    let (code, text) = put(&format!("{}/{wrong_name}", d.url), &dep.nar, env.dir.path());
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("name it nar/"), "{text}");
    assert!(
        !files(&cache).iter().any(|f| f.starts_with("nar/")),
        "{:?}",
        files(&cache)
    );

    // The NAR is fine, but the narinfo claims other contents.
    let (code, text) = put(
        &format!("{}/{}", d.url, dep.nar_url),
        &dep.nar,
        env.dir.path(),
    );
    assert_eq!(code, 200, "{text}");
    let other = nix32_sha256(b"something else");
    // Uncompressed, FileHash and NarHash are one: both lie alike.
    let lying = dep.narinfo.replace(&nix32_sha256(&dep.nar), &other);
    let (code, text) = put(
        &format!("{}/{}.narinfo", d.url, digest(&closure.dep)),
        lying.as_bytes(),
        env.dir.path(),
    );
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("FileHash"), "{text}");
    // Compressed: the file is what the narinfo says, the NAR inside is not.
    let xz = xz(&dep.nar, env.dir.path());
    let file_hash = nix32_sha256(&xz);
    let xz_url = format!("nar/{}.nar.xz", &file_hash["sha256:".len()..]);
    assert_eq!(
        put(&format!("{}/{xz_url}", d.url), &xz, env.dir.path()).0,
        200
    );
    let lying = format!(
        "StorePath: {}\nURL: {xz_url}\nCompression: xz\nFileHash: {file_hash}\nFileSize: {}\nNarHash: {other}\nNarSize: {}\nReferences: \n",
        closure.dep,
        xz.len(),
        dep.nar.len()
    );
    let (code, text) = put(
        &format!("{}/{}.narinfo", d.url, digest(&closure.dep)),
        lying.as_bytes(),
        env.dir.path(),
    );
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("NarHash"), "{text}");
    let bigger = dep.narinfo.replace(
        &format!("Size: {}", dep.nar.len()),
        &format!("Size: {}", dep.nar.len() + 1),
    );
    let (code, text) = put(
        &format!("{}/{}.narinfo", d.url, digest(&closure.dep)),
        bigger.as_bytes(),
        env.dir.path(),
    );
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("Size"), "{text}");
    assert!(!cache
        .join(format!("{}.narinfo", digest(&closure.dep)))
        .exists());
    assert_eq!(
        curl(&[&format!("{}/{}.narinfo", d.url, digest(&closure.dep))]).0,
        404
    );

    // A narinfo before its NAR: 409, and it says what to do.
    let lib = uncompressed(&env, &closure.lib, &[&closure.dep]);
    let (code, text) = put(
        &format!("{}/{}.narinfo", d.url, digest(&closure.lib)),
        lib.narinfo.as_bytes(),
        env.dir.path(),
    );
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("push the NAR first"), "{text}");
}

#[test]
fn a_narinfo_whose_reference_is_absent_is_refused() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, _) = env.keypair("push-1");
    let cache = env.path("cache");
    let d = serve_pushable(&env, &file_url(&cache), &sk, &[]);
    let lib = uncompressed(&env, &closure.lib, &[&closure.dep]);
    let (code, text) = put(
        &format!("{}/{}", d.url, lib.nar_url),
        &lib.nar,
        env.dir.path(),
    );
    assert_eq!(code, 200, "{text}");
    let narinfo_url = format!("{}/{}.narinfo", d.url, digest(&closure.lib));
    let (code, text) = put(&narinfo_url, lib.narinfo.as_bytes(), env.dir.path());
    assert_eq!(code, 409, "{text}");
    assert!(text.contains(&closure.dep[11..]), "{text}");
    assert!(text.contains("push references first"), "{text}");
    assert!(!cache
        .join(format!("{}.narinfo", digest(&closure.lib)))
        .exists());

    // Once the reference is there, the same narinfo is taken (self-references aside).
    let dep = uncompressed(&env, &closure.dep, &[]);
    assert_eq!(
        put(
            &format!("{}/{}", d.url, dep.nar_url),
            &dep.nar,
            env.dir.path()
        )
        .0,
        200
    );
    let dep_url = format!("{}/{}.narinfo", d.url, digest(&closure.dep));
    assert_eq!(put(&dep_url, dep.narinfo.as_bytes(), env.dir.path()).0, 200);
    let (code, text) = put(&narinfo_url, lib.narinfo.as_bytes(), env.dir.path());
    assert_eq!(code, 200, "{text}");
    assert!(cache
        .join(format!("{}.narinfo", digest(&closure.lib)))
        .is_file());
}

#[test]
fn nar_urls_of_other_shapes_are_refused_and_nothing_is_written_outside() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, _) = env.keypair("push-1");
    let outer = env.path("outer");
    let cache = outer.join("cache");
    let d = serve_pushable(&env, &file_url(&cache), &sk, &[]);
    let before = files(&outer);
    let dep = uncompressed(&env, &closure.dep, &[]);
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
        let (code, text) = put(&format!("{}/{path}", d.url), &dep.nar, env.dir.path());
        assert!((400..500).contains(&code), "{path}: {code} {text}");
    }
    // Narinfos whose URL points elsewhere.
    let (code, _) = put(
        &format!("{}/{}", d.url, dep.nar_url),
        &dep.nar,
        env.dir.path(),
    );
    assert_eq!(code, 200);
    let narinfo_url = format!("{}/{}.narinfo", d.url, digest(&closure.dep));
    for url in [
        format!("http://evil.example/{}", dep.nar_url),
        format!("/{}", dep.nar_url),
        format!("nar/../../{hash}.nar"),
        format!("{}/../../x.nar", cache.display()),
    ] {
        let text = dep.narinfo.replace(&dep.nar_url, &url);
        let (code, body) = put(&narinfo_url, text.as_bytes(), env.dir.path());
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
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, _) = env.keypair("push-1");
    let cache = env.path("cache");
    let d = serve_pushable(&env, &file_url(&cache), &sk, &[]);
    let app = uncompressed(&env, &closure.app, &[]);
    short_body(
        &d.url,
        &app.nar_url,
        app.nar.len(),
        &app.nar[..app.nar.len() / 2],
    );
    // The server notices the closed connection, fails the write and removes the temporary.
    assert!(d.logged("broke off"), "{:?}", d.log());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let left: Vec<String> = files(&cache)
        .into_iter()
        .filter(|f| f.starts_with("nar/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(curl(&[&format!("{}/{}", d.url, app.nar_url)]).0, 404);

    // curl killed in the middle of a body it streams slowly.
    let slow = env.path("slow");
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
        .arg(format!("{}/{}", d.url, app.nar_url))
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let left: Vec<String> = files(&cache)
        .into_iter()
        .filter(|f| f.starts_with("nar/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn without_allow_push_a_put_is_405_and_nothing_is_written() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let cache = env.path("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let d = Daemon::start(&env, &["serve", &format!("file://{}", cache.display())]);
    let dep = uncompressed(&env, &closure.dep, &[]);
    let (code, text) = put(
        &format!("{}/{}", d.url, dep.nar_url),
        &dep.nar,
        env.dir.path(),
    );
    assert_eq!(code, 405, "{text}");
    assert!(text.contains("--allow-push"), "{text}");
    let out = env.output(
        "nix",
        &[
            "copy",
            "--from",
            &env.store_arg(),
            "--to",
            &d.url,
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
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, _) = env.keypair("push-1");
    let (pusher_sk, pusher_pk) = env.keypair("pusher-1");
    let cache = env.path("cache");
    let d = serve_pushable(
        &env,
        &file_url(&cache),
        &sk,
        &["--push-trusted-key", &pusher_pk],
    );
    let dep = uncompressed(&env, &closure.dep, &[]);
    assert_eq!(
        put(
            &format!("{}/{}", d.url, dep.nar_url),
            &dep.nar,
            env.dir.path()
        )
        .0,
        200
    );
    let narinfo_url = format!("{}/{}.narinfo", d.url, digest(&closure.dep));
    let (code, text) = put(&narinfo_url, dep.narinfo.as_bytes(), env.dir.path());
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("pusher-1"), "{text}");
    assert!(!cache
        .join(format!("{}.narinfo", digest(&closure.dep)))
        .exists());
    // The real Nix is refused the same way; signed by the trusted key, the closure goes in.
    let out = env.output(
        "nix",
        &[
            "copy",
            "--from",
            &env.store_arg(),
            "--to",
            &d.url,
            &closure.app,
        ],
    );
    assert!(!out.status.success());
    env.run(
        "nix",
        &[
            "store",
            "sign",
            "--store",
            &env.store_arg(),
            "-k",
            pusher_sk.to_str().unwrap(),
            "-r",
            &closure.app,
        ],
    );
    env.copy_to(&d.url, &[&closure.app]);
    assert_eq!(curl(&[&narinfo_url]).0, 200);
}
