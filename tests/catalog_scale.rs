//! The explorer's catalog under hostile clients and at scale: clients asking for digests
//! that do not exist add nothing to it, it holds no more than its bound, and a cache of
//! 100,000 objects gets correct index pages (first and last entries, both orders, searches).
//!
//! Speed is measured by `bench/catalog.sh`, not asserted here.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{curl, Daemon, NixEnv};

const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
const WORDS: [&str; 12] = [
    "hello",
    "glibc",
    "python3",
    "zlib",
    "bash",
    "openssl",
    "Perl",
    "gcc",
    "curl",
    "coreutils",
    "systemd",
    "nodejs",
];
/// Objects the others refer to (like glibc and its friends in a real cache).
const BASE: usize = 200;

/// splitmix64: a bijection, so distinct inputs give distinct digests.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 32-character digest from a number and a salt.
fn digest(i: u64, salt: u64) -> String {
    // 12 characters (60 bits) from each of three mixes.
    let parts: Vec<u64> = (0..3u64)
        .map(|j| mix((i ^ (salt << 48)).wrapping_add(j << 56)))
        .collect();
    (0..32)
        .map(|k| ALPHABET[((parts[k / 12] >> (5 * (k % 12))) & 31) as usize] as char)
        .collect()
}

/// One generated object.
#[derive(Clone)]
struct Obj {
    digest: String,
    name: String,
    nar_size: u64,
}

/// Writes a `file://` cache of `n` synthetic narinfos (no NARs: the index needs none) and
/// returns its objects.
fn generate(dir: &Path, n: usize) -> Vec<Obj> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .unwrap();
    let objs: Vec<Obj> = (0..n)
        .map(|i| Obj {
            digest: digest(i as u64, 1),
            name: format!("{}-{}.{}", WORDS[i % WORDS.len()], i / WORDS.len(), i % 7),
            // Many equal sizes, so ties (broken by digest) are exercised too.
            nar_size: 1024 + (mix(i as u64) % 5000) * 512,
        })
        .collect();
    // Written by a few threads: creating 100,000 files is mostly system time.
    let chunk = n.div_ceil(4).max(1);
    std::thread::scope(|s| {
        for (c, part) in objs.chunks(chunk).enumerate() {
            let objs = &objs;
            s.spawn(move || {
                for (k, o) in part.iter().enumerate() {
                    write_narinfo(dir, objs, c * chunk + k, o);
                }
            });
        }
    });
    objs
}

fn write_narinfo(dir: &Path, objs: &[Obj], i: usize, o: &Obj) {
    let refs: Vec<String> = if i < BASE {
        (i.saturating_sub(2)..i)
            .map(|j| format!("{}-{}", objs[j].digest, objs[j].name))
            .collect()
    } else {
        (0..3)
            .map(|k| &objs[(mix((i * 3 + k) as u64) % BASE as u64) as usize])
            .map(|r| format!("{}-{}", r.digest, r.name))
            .collect()
    };
    let text = format!(
        "StorePath: /nix/store/{}-{}\nURL: nar/{}.nar.xz\nCompression: xz\n\
         FileHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nFileSize: {}\n\
         NarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: {}\n\
         References: {}\n",
        o.digest,
        o.name,
        o.digest,
        o.nar_size / 3,
        o.nar_size,
        refs.join(" ")
    );
    std::fs::write(dir.join(format!("{}.narinfo", o.digest)), text).unwrap();
}

/// Requests the index (which makes discovery due) until the catalog holds `want` objects.
fn discover(daemon: &Daemon, want: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (code, _) = curl(&[&format!("{}/", daemon.url)]);
        assert_eq!(code, 200);
        let have = daemon.metric("nixcached_catalog_objects");
        if have == want {
            return;
        }
        assert!(
            have < want && Instant::now() < deadline,
            "catalog holds {have} objects, want {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One parsed index page.
struct IndexPage {
    digests: Vec<String>,
    matching: u64,
    known: u64,
    next_after: Option<String>,
    full_notice: bool,
}

fn index(daemon: &Daemon, query: &str) -> IndexPage {
    let (code, body) = curl(&[&format!("{}/?{query}", daemon.url)]);
    assert_eq!(code, 200, "/?{query}");
    let html = String::from_utf8(body).unwrap();
    let digests = html
        .split("<td class=\"hash\"><code>")
        .skip(1)
        .map(|s| s[..32].to_owned())
        .collect();
    let count = html
        .split("<p class=\"count\">")
        .nth(1)
        .expect("count line");
    let mut words = count.split_whitespace();
    let matching = words.next().unwrap().parse().unwrap();
    let known = words.nth(2).unwrap().parse().unwrap();
    let next_after = html
        .split("rel=\"next\" href=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|href| href.split("after=").nth(1))
        .map(|a| a[..32].to_owned());
    IndexPage {
        digests,
        matching,
        known,
        next_after,
        full_notice: html.contains("id=\"full-notice\""),
    }
}

/// The objects matching `q` in the order `sort` shows them, the slow and obvious way.
fn expected(objs: &[Obj], q: &str, sort: &str) -> Vec<String> {
    let q = q.to_lowercase();
    let mut m: Vec<&Obj> = objs
        .iter()
        .filter(|o| o.name.to_lowercase().contains(&q))
        .collect();
    match sort {
        "size" => m.sort_by(|a, b| (b.nar_size, &a.digest).cmp(&(a.nar_size, &b.digest))),
        _ => m.sort_by(|a, b| (&a.name, &a.digest).cmp(&(&b.name, &b.digest))),
    }
    m.into_iter().map(|o| o.digest.clone()).collect()
}

#[test]
fn clients_asking_for_missing_objects_add_nothing_and_the_bound_binds() {
    let env = NixEnv::new();
    let cache = env.path("cache");
    let objs = generate(&cache, 50);
    let url = format!("file://{}", cache.display());
    let daemon = Daemon::start(&env, &["serve", &url, "--max-list-frequency", "0s"]);
    discover(&daemon, 50, Duration::from_secs(30));
    let referenced = daemon.metric("nixcached_catalog_referenced");

    // 1000 digests nobody has, asked every way a client can name an object.
    for i in 0..250u64 {
        let d = digest(i, 99);
        for (path, accept) in [
            (format!("/{d}.narinfo"), "*/*"),
            (format!("/{d}.narinfo"), "text/html"),
            (format!("/{d}/browse/"), "text/html"),
            (format!("/?after={d}&sort=size"), "text/html"),
        ] {
            let (code, _) = curl(&[
                "-H",
                &format!("Accept: {accept}"),
                &format!("{}{path}", daemon.url),
            ]);
            assert!(
                code == 404 || (code == 200 && path.starts_with("/?")),
                "{path}: {code}"
            );
        }
    }
    // Discovery runs again (every visit makes it due) and still finds the same 50.
    discover(&daemon, 50, Duration::from_secs(30));
    assert_eq!(daemon.metric("nixcached_catalog_referenced"), referenced);
    drop(daemon);

    // A bound below the store's size: the catalog stops at it, says so, and the objects
    // beyond are still served (and still not listed).
    let daemon = Daemon::start(
        &env,
        &[
            "serve",
            &url,
            "--max-list-frequency",
            "0s",
            "--index-max-objects",
            "20",
        ],
    );
    discover(&daemon, 20, Duration::from_secs(30));
    let page = index(&daemon, "");
    assert_eq!((page.known, page.digests.len()), (20, 20));
    assert!(page.full_notice, "the index says it is full");
    for o in &objs {
        let (code, _) = curl(&[&format!("{}/{}.narinfo", daemon.url, o.digest)]);
        assert_eq!(code, 200);
    }
    discover(&daemon, 20, Duration::from_secs(30));
}

#[test]
fn index_pages_of_a_hundred_thousand_objects() {
    const N: usize = 100_000;
    let env = NixEnv::new();
    let cache = env.path("cache");
    let objs = generate(&cache, N);
    let url = format!("file://{}", cache.display());
    let daemon = Daemon::start(&env, &["serve", &url]);
    discover(&daemon, N as u64, Duration::from_secs(240));

    for sort in ["name", "size"] {
        for q in [
            "",
            "hello",
            "O",
            "GLIBC-12",
            "perl-4242.",
            "-1",
            "zlib-7777.6",
            "absent",
        ] {
            let want = expected(&objs, q, sort);
            let qs = format!("sort={sort}&q={q}");
            let first = index(&daemon, &qs);
            assert_eq!(first.known, N as u64);
            assert!(!first.full_notice);
            assert_eq!(first.matching, want.len() as u64, "{qs}");
            let shown = want.len().min(100);
            assert_eq!(first.digests, want[..shown], "first page of {qs}");
            assert_eq!(first.next_after.is_some(), want.len() > 100, "{qs}");
            if let Some(a) = &first.next_after {
                assert_eq!(a, &want[99]);
                let second = index(&daemon, &format!("{qs}&after={a}"));
                assert_eq!(second.digests, want[100..want.len().min(200)], "{qs}");
            }
            if want.len() > 100 {
                // Seek straight to the last page: the 100 after the 101st from the end.
                let before_last = &want[want.len() - 101];
                let last = index(&daemon, &format!("{qs}&after={before_last}"));
                assert_eq!(last.digests, want[want.len() - 100..], "last page of {qs}");
                assert!(last.next_after.is_none(), "{qs}");
            }
        }
    }
}
