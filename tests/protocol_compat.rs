//! The parts of the binary cache protocol that other writers use: objects stored with a
//! `Content-Encoding` (Nix's `narinfo-compression`, `ls-compression`, `log-compression`),
//! nix-serve's NAR URLs, and build logs that `upload` writes for `nix log`.

mod common;

use std::path::Path;

use common::ca::{build_ca, substitute_ca, CA};
use common::modern::Client;
use common::peers::{new_gcs_bucket, new_s3_bucket};
use common::{curl, Daemon, NixEnv};
use nixcached_actors::formats::Compression;

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    use futures::StreamExt;
    let input: nixcached_actors::store::ByteStream = Box::pin(futures::stream::once({
        let b = bytes::Bytes::copy_from_slice(data);
        async move { Ok(b) }
    }));
    common::block_on(async {
        let mut out = Vec::new();
        let mut s = c.compress_stream(input, None);
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    })
}

/// How Nix's S3 store writes an object with `<kind>-compression` set: compressed, with the
/// object's `Content-Encoding` naming the compression.
fn encoding_for(key: &str) -> Option<Compression> {
    if key.ends_with(".narinfo") {
        Some(Compression::Xz)
    } else if key.ends_with(".ls") || key.starts_with("log/") {
        Some(Compression::Br)
    } else {
        None
    }
}

/// Every file below `dir`, as keys relative to it.
fn keys(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The cache the real Nix wrote, copied object by object into a bucket the way its S3
/// store writes one with `narinfo-compression=xz&ls-compression=br&log-compression=br`.
fn upload_encoded(env: &NixEnv, dir: &Path, put: &dyn Fn(&str, &Path, Option<Compression>)) {
    for key in keys(dir) {
        let plain = std::fs::read(dir.join(&key)).unwrap();
        let enc = encoding_for(&key);
        let body = match enc {
            Some(c) => compress(c, &plain),
            None => plain,
        };
        let file = env.path("object");
        std::fs::write(&file, body).unwrap();
        put(&key, &file, enc);
    }
}

fn s3_put<'a>(ep: &'a str, bucket: &'a str) -> impl Fn(&str, &Path, Option<Compression>) + 'a {
    move |key, file, enc| {
        // Readable without credentials (the upstream case reads it over plain HTTP); a
        // form Content-Type would make moto parse the body as a form.
        let mut args: Vec<String> = [
            "-X",
            "PUT",
            "-H",
            "x-amz-acl: public-read",
            "-H",
            "Content-Type: application/octet-stream",
        ]
        .map(String::from)
        .to_vec();
        if let Some(c) = enc {
            args.extend(["-H".into(), format!("Content-Encoding: {}", c.name())]);
        }
        args.extend([
            "--data-binary".into(),
            format!("@{}", file.display()),
            format!("{ep}/{bucket}/{key}"),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&args);
        assert_eq!(code, 200, "{key}: {}", String::from_utf8_lossy(&body));
    }
}

fn gcs_put<'a>(ep: &'a str, bucket: &'a str) -> impl Fn(&str, &Path, Option<Compression>) + 'a {
    move |key, file, enc| {
        // A multipart upload carries the object's metadata, contentEncoding among it.
        let meta = match enc {
            Some(c) => format!(r#"{{"name":"{key}","contentEncoding":"{}"}}"#, c.name()),
            None => format!(r#"{{"name":"{key}"}}"#),
        };
        let (code, body) = curl(&[
            "-X",
            "POST",
            "-F",
            &format!("metadata={meta};type=application/json"),
            "-F",
            &format!("file=@{};type=application/octet-stream", file.display()),
            "-H",
            "Content-Type: multipart/related",
            &format!("{ep}/upload/storage/v1/b/{bucket}/o?uploadType=multipart"),
        ]);
        assert_eq!(code, 200, "{key}: {}", String::from_utf8_lossy(&body));
    }
}

/// A signed closure with a build log, copied by the real Nix into a `file://` cache with
/// listings; returns (cache dir, app, lib, lib's derivation, public key).
fn real_cache(env: &NixEnv) -> (std::path::PathBuf, String, String, String, String) {
    let c = env.build_closure();
    let (sk, pk) = env.keypair("compat-1");
    env.sign_closure(&sk, &c.app);
    let dir = env.path("written-by-nix");
    let url = format!(
        "file://{}?write-nar-listing=1&compression=xz",
        dir.display()
    );
    env.copy_to(&url, &[&c.app]);
    let drv = env.deriver_of(&c.lib);
    env.run(
        "nix",
        &[
            "store",
            "copy-log",
            "--store",
            &env.store_arg(),
            "--to",
            &url,
            &format!("/nix/store/{drv}"),
        ],
    );
    assert!(
        dir.join(format!("log/{drv}")).exists(),
        "nix store copy-log wrote no log"
    );
    (dir, c.app, c.lib, drv, pk)
}

fn get(url: &str) -> String {
    let (code, body) = curl(&[url]);
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{url}: {text}");
    text
}

/// What every reader of such a cache must see: plain narinfo, JSON listing, the log's
/// text, and the real Nix substituting and reading the log through it.
fn check_served(env: &NixEnv, base: &str, app: &str, lib: &str, drv: &str, pk: &str, tag: &str) {
    let digest = &app["/nix/store/".len()..][..32];
    let ni = get(&format!("{base}/{digest}.narinfo"));
    assert!(ni.starts_with("StorePath: "), "{tag}: {ni}");
    let ls = get(&format!("{base}/{digest}.ls"));
    let json: serde_json::Value =
        serde_json::from_str(&ls).unwrap_or_else(|e| panic!("{tag}: {e}: {ls}"));
    assert!(json["root"]["entries"]["bin"].is_object(), "{tag}: {ls}");
    let log = get(&format!("{base}/log/{drv}"));
    assert!(log.contains("building testlib"), "{tag}: {log:?}");
    env.substitute_from(base, app, pk, tag);
    let shown = env.run("nix", &["log", "--store", base, lib]);
    assert!(
        shown.contains("building testlib"),
        "{tag}: nix log said {shown:?}"
    );
}

#[test]
fn buckets_written_with_compressed_narinfos_listings_and_logs_are_read_as_nix_reads_them() {
    let env = NixEnv::new();
    let (dir, app, lib, drv, pk) = real_cache(&env);

    let (ep, bucket) = new_s3_bucket("encoded");
    upload_encoded(&env, &dir, &s3_put(&ep, &bucket));
    // The bucket really holds them encoded: S3 hands the bytes and the header back as stored.
    let digest = &app["/nix/store/".len()..][..32];
    let (_, raw) = curl(&[&format!("{ep}/{bucket}/{digest}.narinfo")]);
    assert!(
        raw.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']),
        "not stored as xz"
    );
    let s3 = Daemon::start(
        &env,
        &[
            "serve",
            &format!("s3://{bucket}?endpoint={ep}&region=us-east-1"),
        ],
    );
    check_served(&env, &s3.url, &app, &lib, &drv, &pk, "s3");

    // An upstream that is such a bucket behind HTTP (how cache.nixos.org serves its brotli
    // listings and logs): the answers carry `Content-Encoding`.
    let front = env.path("front");
    std::fs::create_dir_all(&front).unwrap();
    let up = Daemon::start(
        &env,
        &[
            "serve",
            &format!("file://{}", front.display()),
            "--upstream",
            &format!("{ep}/{bucket}"),
            "--trusted-public-key",
            &pk,
        ],
    );
    check_served(&env, &up.url, &app, &lib, &drv, &pk, "upstream");

    let (gep, gbucket) = new_gcs_bucket("encoded");
    upload_encoded(&env, &dir, &gcs_put(&gep, &gbucket));
    let gs = Daemon::start(&env, &["serve", &format!("gs://{gbucket}?endpoint={gep}")]);
    check_served(&env, &gs.url, &app, &lib, &drv, &pk, "gs");
}

#[test]
fn a_narinfo_that_decompresses_past_its_cap_is_refused_not_buffered() {
    let env = NixEnv::new();
    let (ep, bucket) = new_s3_bucket("bomb");
    let digest = "0".repeat(32);
    // 64 MiB of text as a few KiB of xz: far past any narinfo.
    let bomb = compress(Compression::Xz, &vec![b'a'; 64 << 20]);
    assert!(bomb.len() < 64 * 1024);
    let file = env.path("bomb");
    std::fs::write(&file, bomb).unwrap();
    s3_put(&ep, &bucket)(&format!("{digest}.narinfo"), &file, Some(Compression::Xz));
    let d = Daemon::start(
        &env,
        &[
            "serve",
            &format!("s3://{bucket}?endpoint={ep}&region=us-east-1"),
        ],
    );
    let (code, _) = curl(&[&format!("{}/{digest}.narinfo", d.url)]);
    assert_eq!(code, 404);
    assert!(
        d.logged("decompresses to more than"),
        "the log does not say why: {:?}",
        d.log()
    );
    // Still serving.
    let (code, _) = curl(&[&format!("{}/nix-cache-info", d.url)]);
    assert_eq!(code, 200);
}

#[test]
fn nix_serve_nar_urls_are_answered_for_the_nar_they_name() {
    let env = NixEnv::new();
    let c = env.build_closure();
    let d = Daemon::start(&env, &["serve", &format!("local?root={}", env.store_arg())]);
    let digest = &c.app["/nix/store/".len()..][..32];
    let ni = get(&format!("{}/{digest}.narinfo", d.url));
    let nar_hash = ni
        .lines()
        .find_map(|l| l.strip_prefix("NarHash: sha256:"))
        .unwrap();
    let (code, ours) = curl(&[&format!("{}/nar/{digest}.nar", d.url)]);
    assert_eq!(code, 200);
    let (code, legacy) = curl(&[&format!("{}/nar/{digest}-{nar_hash}.nar", d.url)]);
    assert_eq!(code, 200);
    assert_eq!(legacy, ours);
    assert_eq!(legacy, env.dump(&env.real(&c.app)));
    // A NAR hash that is not the path's: a stale narinfo, whose hashes would not match.
    let other = "1".repeat(52);
    let (code, _) = curl(&[&format!("{}/nar/{digest}-{other}.nar", d.url)]);
    assert_eq!(code, 404);
}

/// `nixcached upload` of `path`'s closure from the environment's store into the folder `dest`
/// (relative to the environment), with `extra` flags; it ends at the end of its input.
fn upload_once(env: &NixEnv, path: &str, dest: &str, extra: &[&str]) {
    let input = env.path(&format!("paths-{dest}"));
    std::fs::write(&input, format!("{path}\n")).unwrap();
    let out = env
        .cmd(BIN)
        .args(["upload", "--input", input.to_str().unwrap()])
        .args(["--from", &format!("local?root={}", env.store_arg())])
        .args([
            "--state-dir",
            env.path(&format!("state-{dest}")).to_str().unwrap(),
        ])
        .args(extra)
        .arg(format!("file://{}", env.path(dest).display()))
        .output()
        .unwrap();
    common::assert_succeeded(&out);
}

#[test]
fn upload_writes_build_logs_that_nix_log_reads_from_the_cache() {
    let env = NixEnv::new();
    let c = env.build_closure();
    upload_once(&env, &c.app, "with-logs", &[]);
    upload_once(&env, &c.app, "without-logs", &["--write-build-logs=false"]);
    let drv = env.deriver_of(&c.lib);
    let log = env.path(&format!("with-logs/log/{drv}"));
    assert!(log.exists(), "no log/{drv} written");
    assert!(!env.path(&format!("without-logs/log/{drv}")).exists());
    let d = Daemon::start(
        &env,
        &[
            "serve",
            &format!("file://{}", env.path("with-logs").display()),
        ],
    );
    let shown = env.run("nix", &["log", "--store", &d.url, &c.lib]);
    assert!(shown.contains("building testlib"), "nix log said {shown:?}");
}

#[test]
fn content_addressed_outputs_are_found_by_their_realisations_served_uploaded_and_pushed() {
    let env = NixEnv::new();
    env.set_nix_config(Some(CA.into()));
    let (drv, out, id, file) = build_ca(&env);
    let (sk, pk) = env.keypair("ca-1");
    // `nix copy` of the derivation's output by expression, which takes its realisation along.
    let copy_ca = |to: &str| {
        let f = file.to_str().unwrap();
        env.run(
            "nix",
            &["copy", "--store", &env.store_arg(), "--to", to, "-f", f],
        );
    };

    // Served from the local store's database.
    let local = Daemon::start(
        &env,
        &[
            "serve",
            "--secret-key-file",
            sk.to_str().unwrap(),
            &format!("local?root={}", env.store_arg()),
        ],
    );
    let served = get(&format!("{}/realisations/{id}.doi", local.url));
    // What Nix itself writes into a cache for it, byte for byte.
    let by_nix = env.path("by-nix");
    copy_ca(&format!("file://{}", by_nix.display()));
    let nix_text = std::fs::read_to_string(by_nix.join(format!("realisations/{id}.doi"))).unwrap();
    assert_eq!(served, nix_text);
    substitute_ca(Client::Nix28, &env, &local.url, &pk, &drv, &out, "local");
    let (code, _) = curl(&[&format!(
        "{}/realisations/{}.doi",
        local.url,
        id.replace("!out", "!dev")
    )]);
    assert_eq!(code, 404);
    let (code, _) = curl(&[&format!("{}/realisations/sha256:..!out.doi", local.url)]);
    assert_eq!(code, 400);

    // Uploaded with the path, into a cache served to a fresh client.
    upload_once(
        &env,
        &out,
        "ca-cache",
        &["--secret-key-file", sk.to_str().unwrap()],
    );
    let cache = env.path("ca-cache");
    let uploaded = std::fs::read_to_string(cache.join(format!("realisations/{id}.doi"))).unwrap();
    assert_eq!(uploaded, nix_text);
    let over_cache = Daemon::start(&env, &["serve", &format!("file://{}", cache.display())]);
    substitute_ca(
        Client::Nix28,
        &env,
        &over_cache.url,
        &pk,
        &drv,
        &out,
        "uploaded",
    );

    // Pushed by the real nix copy into a cache taking pushes.
    let pushed = env.path("ca-pushed");
    std::fs::create_dir_all(&pushed).unwrap();
    let push = common::credentials::serve_pushable(
        &env,
        &format!("file://{}", pushed.display()),
        &sk,
        &[],
    );
    // The credential's netrc, and the experimental feature.
    let netrc = env.path("push-netrc");
    env.set_nix_config(Some(format!("{CA}\nnetrc-file = {}", netrc.display())));
    copy_ca(&push.url);
    assert_eq!(
        std::fs::read_to_string(pushed.join(format!("realisations/{id}.doi"))).unwrap(),
        nix_text
    );
    substitute_ca(Client::Nix28, &env, &push.url, &pk, &drv, &out, "pushed");
}
