//! What a push may cost and what survives a restart: bodies are capped, large NARs stream
//! through in bounded memory, and a narinfo pushed after a restart is checked against its NAR
//! read back from the store; a body that breaks off leaves no object in a bucket either.

use std::io::Read;

use nixcached_actors::store::url::StoreUrl;

use crate::bed::{short_body, uncompressed, Bed};
use crate::common::credentials::push_writer;
use crate::common::peers::{gcs_bucket, s3_bucket};
use crate::common::{block_on, curl, nix32_sha256, NixEnv};
use crate::{digest, serve_pushable};

#[test]
fn after_a_restart_a_narinfo_is_checked_against_its_nar_read_back() {
    let mut b = Bed::new("cache", |_| Vec::new());
    let dep = uncompressed(&b.env, &b.closure.dep, &[]);
    let lib = uncompressed(&b.env, &b.closure.lib, &[&b.closure.dep]);
    assert_eq!(b.put(&dep.nar_url, &dep.nar).0, 200);
    assert_eq!(b.put(&lib.nar_url, &lib.nar).0, 200);
    b.restart();
    // Changed on disk while no server watched: lib's NAR now holds dep's bytes.
    std::fs::write(b.cache.join(&lib.nar_url), &dep.nar).unwrap();

    let bigger = dep.narinfo.replace(
        &format!("Size: {}", dep.nar.len()),
        &format!("Size: {}", dep.nar.len() + 1),
    );
    let (code, text) = b.put(&dep.narinfo_key, bigger.as_bytes());
    assert_eq!(code, 422, "{text}");
    let (code, text) = b.put(&dep.narinfo_key, dep.narinfo.as_bytes());
    assert_eq!(code, 200, "{text}");
    let (code, text) = b.put(&lib.narinfo_key, lib.narinfo.as_bytes());
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("FileHash"), "{text}");
    assert!(!b.holds(&lib.narinfo_key));
}

#[test]
fn oversized_and_encoded_bodies_are_refused() {
    let b = Bed::new("cache", |_| Vec::new());
    let dep = uncompressed(&b.env, &b.closure.dep, &[]);
    assert_eq!(b.put(&dep.nar_url, &dep.nar).0, 200);
    // A narinfo of more than 1 MiB: one long line of junk after a real one.
    let huge = format!("{}X-Junk: {}\n", dep.narinfo, "a".repeat(1 << 20));
    let (code, text) = b.put(&dep.narinfo_key, huge.as_bytes());
    assert_eq!(code, 413, "{text}");
    let (code, text) = b.put(&format!("{}.ls", digest(&b.closure.dep)), b"{not json");
    assert_eq!(code, 400, "{text}");
    let file = b.env.path("narinfo");
    std::fs::write(&file, &dep.narinfo).unwrap();
    let (code, text) = curl(&[
        "-X",
        "PUT",
        "-H",
        &b.auth(),
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{}/{}", b.d.url, dep.narinfo_key),
    ]);
    assert_eq!(code, 415, "{}", String::from_utf8_lossy(&text));
    assert!(!b.holds(&dep.narinfo_key));
    assert!(!b.holds(&format!("{}.ls", digest(&b.closure.dep))));
}

#[test]
fn large_nars_are_pushed_in_bounded_memory() {
    let b = Bed::new("cache", |_| Vec::new());
    let mut paths = Vec::new();
    for name in ["big-plain", "big-zstd"] {
        let dir = b.env.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::File::create(dir.join("data")).unwrap();
        f.set_len(256 * 1024 * 1024 + name.len() as u64).unwrap();
        paths.push(b.env.add(&dir));
    }
    // Uncompressed, 256 MiB of body stream through to the file; as zstd, a small body
    // decompresses to 256 MiB on the side to be hashed.
    b.env
        .copy_to(&format!("{}?compression=none", b.d.url), &[&paths[0]]);
    b.env
        .copy_to(&format!("{}?compression=zstd", b.d.url), &[&paths[1]]);
    for p in &paths {
        assert_eq!(b.get(&format!("{}.narinfo", digest(p))), 200, "{p}");
    }
    let peak = b.d.peak_rss_kib();
    eprintln!(
        "two 256 MiB NARs pushed, server peak RSS {} MiB",
        peak / 1024
    );
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn an_upload_cut_short_leaves_no_object_in_s3_or_gcs() {
    let env = NixEnv::new();
    let (sk, _) = env.keypair("push-1");
    // Larger than a multipart part or a resumable chunk, so the store has begun writing
    // when the body breaks off.
    let dir = env.path("cut");
    std::fs::create_dir_all(&dir).unwrap();
    let mut random = vec![0u8; 20 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut random)
        .unwrap();
    std::fs::write(dir.join("data"), &random).unwrap();
    let path = env.add(&dir);
    let nar = env.dump(&env.real(&path));
    let nar_url = format!("nar/{}.nar", &nix32_sha256(&nar)["sha256:".len()..]);
    for store in [s3_bucket("cut"), gcs_bucket("cut")] {
        let d = serve_pushable(&env, &store, &sk, &[]);
        let auth = crate::common::credentials::bearer(&push_writer(&env).0);
        short_body(&d.url, &auth, &nar_url, nar.len(), &nar[..nar.len() - 1000]);
        assert!(d.logged("broke off"), "{store}: {:?}", d.log());
        let opened = StoreUrl::parse(&store).unwrap().open().unwrap();
        let exists = block_on(opened.exists(&nar_url)).unwrap();
        assert!(!exists, "{store}: {nar_url} is there");
        assert_eq!(curl(&[&format!("{}/{nar_url}", d.url)]).0, 404, "{store}");
    }
}

#[test]
fn build_logs_are_pushed_by_nix_store_copy_log() {
    let b = Bed::new("cache", |_| Vec::new());
    let drv = b.env.deriver_of(&b.closure.lib);
    let store = b.env.store_arg();
    b.env.run(
        "nix",
        &[
            "store",
            "copy-log",
            "--from",
            &store,
            "--to",
            &b.d.url,
            &format!("/nix/store/{drv}"),
        ],
    );
    let (code, log) = curl(&[&format!("{}/log/{drv}", b.d.url)]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&log).contains("building testlib"));
    // A log for what is not a derivation's name goes nowhere.
    let (code, text) = b.put("log/../../x.drv", b"x");
    assert!((400..500).contains(&code), "{code} {text}");
    let (code, text) = b.put("log/not-a-store-path.drv", b"x");
    assert_eq!(code, 400, "{text}");
}
