//! Hostile pushes, by curl and by a raw socket: refused with a 4xx saying what to do, and
//! nothing stored.

use crate::bed::{files, short_body, uncompressed, xz, Bed};
use crate::common::{curl, nix32_sha256, Daemon, NixEnv};
use crate::file_url;

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

#[test]
fn an_upload_cut_short_leaves_no_nar() {
    let b = Bed::new("cache", |_| Vec::new());
    let app = uncompressed(&b.env, &b.closure.app, &[]);
    short_body(
        &b.d.url,
        &b.auth(),
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
            "-H",
            &b.auth(),
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

/// Nothing is writable without a write credential: a push without one, or with a wrong one,
/// is 401 and stores nothing, the real Nix without its netrc is refused the same way, and a
/// cache that takes pushes does not start without a write credential at all.
#[test]
fn a_push_without_the_write_credential_is_401_and_stores_nothing() {
    let b = Bed::new("cache", |_| Vec::new());
    let dep = uncompressed(&b.env, &b.closure.dep, &[]);
    let file = b.env.path("nar");
    std::fs::write(&file, &dep.nar).unwrap();
    let target = format!("{}/{}", b.d.url, dep.nar_url);
    let data = format!("@{}", file.display());
    for auth in [None, Some("Authorization: Bearer not-the-token")] {
        let mut args = vec!["-X", "PUT", "--data-binary", &data];
        if let Some(a) = auth {
            args.extend(["-H", a]);
        }
        args.push(&target);
        let (code, text) = curl(&args);
        assert_eq!(code, 401, "{auth:?}: {}", String::from_utf8_lossy(&text));
    }
    // The environment's Nix sends the credential from its netrc; without it, it is refused.
    b.env.set_nix_config(None);
    let to = b.d.url.clone();
    let store = b.env.store_arg();
    let out = b.env.output(
        "nix",
        &["copy", "--from", &store, "--to", &to, &b.closure.dep],
    );
    assert!(!out.status.success(), "pushed without a credential");
    assert!(
        files(&b.cache).iter().all(|f| f == "nix-cache-info"),
        "{:?}",
        files(&b.cache)
    );

    let out = b.env.output(
        env!("CARGO_BIN_EXE_nixcached"),
        &[
            "serve",
            "--allow-push",
            "--listen",
            "127.0.0.1:0",
            &format!("file://{}", b.cache.display()),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no credential with the write right"), "{err}");
}
