//! Untrusted bytes from a cache cannot crash or exhaust the daemon: NARs nested far deeper
//! than any store path, hostile `.ls` listings, oversized narinfos, NARs that decompress to
//! more than their narinfo's `NarSize`, directories of tens of thousands of entries, and a
//! bzip2 build log that decompresses to hundreds of MiB. The caches are `file://` folders
//! written by hand, since no real Nix would write these; the checks end by asking for a
//! normal object, which must still answer.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{curl, nix32_sha256, Daemon, NixEnv};

/// Appends one NAR token: length (u64 LE), bytes, zero padding to 8.
fn tok(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
    out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
}

fn toks(out: &mut Vec<u8>, all: &[&[u8]]) {
    for t in all {
        tok(out, t);
    }
}

/// A NAR of `depth` directories, each holding the next as `d`; built in a loop, as the
/// daemon must read it.
fn deep_nar(depth: usize) -> Vec<u8> {
    let mut n = Vec::with_capacity(depth * 160 + 64);
    tok(&mut n, b"nix-archive-1");
    for _ in 0..depth {
        toks(
            &mut n,
            &[
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"d",
                b"node",
            ],
        );
    }
    toks(&mut n, &[b"(", b"type", b"directory", b")"]);
    for _ in 0..depth {
        toks(&mut n, &[b")", b")"]);
    }
    n
}

/// A NAR of one directory holding `hello` (`hi\n`).
fn hello_nar() -> Vec<u8> {
    let mut n = Vec::new();
    toks(
        &mut n,
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"hello",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hi\n",
            b")",
            b")",
            b")",
        ],
    );
    n
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut c = Command::new("xz")
        .args(["-c", "-T1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("xz");
    let mut stdin = c.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = c.wait_with_output().unwrap();
    w.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// A store-path digest (32 characters of Nix's base-32 alphabet) numbered `i`.
fn digest(i: u32) -> String {
    format!("{i:0>32}")
}

/// Writes the narinfo and the `.nar.xz` of one object into the cache folder `dir`;
/// `nar_size` overrides the true size (to lie about it).
fn put(dir: &Path, i: u32, name: &str, nar: &[u8], nar_size: Option<u64>) -> String {
    let file = xz(nar);
    write_object(
        dir,
        i,
        name,
        &file,
        &nix32_sha256(nar),
        nar_size.unwrap_or(nar.len() as u64),
        "",
    )
}

fn write_object(
    dir: &Path,
    i: u32,
    name: &str,
    file: &[u8],
    nar_hash: &str,
    nar_size: u64,
    extra: &str,
) -> String {
    let d = digest(i);
    let file_hash = nix32_sha256(file);
    let key = format!("nar/{}.nar.xz", &file_hash["sha256:".len()..]);
    fs::create_dir_all(dir.join("nar")).unwrap();
    fs::write(dir.join(&key), file).unwrap();
    fs::write(
        dir.join(format!("{d}.narinfo")),
        format!(
            "StorePath: /nix/store/{d}-{name}\nURL: {key}\nCompression: xz\nFileHash: {file_hash}\nFileSize: {}\nNarHash: {nar_hash}\nNarSize: {nar_size}\nReferences: \n{extra}",
            file.len()
        ),
    )
    .unwrap();
    d
}

fn cache(env: &NixEnv) -> std::path::PathBuf {
    let dir = env.path("cache");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    dir
}

fn get(d: &Daemon, rel: &str) -> (u16, String) {
    let (code, body) = curl(&["-H", "Accept: text/html", &format!("{}/{rel}", d.url)]);
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// The daemon still answers, and browses a normal object.
fn assert_alive(d: &Daemon, good: &str) {
    let (code, body) = get(d, "healthz");
    assert_eq!(code, 200, "the daemon died: {body}");
    let (code, body) = get(d, &format!("{good}/browse/"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello"), "{body}");
}

#[test]
fn a_nar_nested_100000_deep_is_an_error_not_a_stack_overflow() {
    let env = NixEnv::new();
    let dir = cache(&env);
    let good = put(&dir, 1, "good", &hello_nar(), None);
    let deep = put(&dir, 2, "deep", &deep_nar(100_000), None);
    let nar_key = fs::read_to_string(dir.join(format!("{deep}.narinfo")))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    let d = Daemon::start(&env, &["serve", &format!("file://{}", dir.display())]);

    let (code, body) = get(&d, &format!("{deep}/browse/"));
    assert!(
        code == 502 && body.contains("<html"),
        "browse answered {code}: {body}"
    );
    assert_alive(&d, &good);
    let (code, body) = get(&d, &format!("{deep}/browse/d/d/d"));
    assert!(code == 502, "browse below answered {code}: {body}");
    let (code, _) = get(&d, &format!("{deep}/file/d"));
    assert!(code == 502, "file answered {code}");
    // The protocol routes never parse the NAR: the `.ls` is missing, the NAR is served as is.
    let (code, _) = curl(&[&format!("{}/{deep}.ls", d.url)]);
    assert_eq!(code, 404);
    let (code, _) = curl(&[&format!("{}/{nar_key}", d.url)]);
    assert_eq!(code, 200);
    assert!(d.logged("deeper than"), "the log says why");
    assert_alive(&d, &good);
}

#[test]
fn hostile_listings_fall_back_to_the_nar_in_bounded_memory() {
    let env = NixEnv::new();
    let dir = cache(&env);
    let good = put(&dir, 1, "good", &hello_nar(), None);

    // A `.ls` nested 100,000 levels deep beside a good NAR.
    let deep_ls = put(&dir, 2, "deep-ls", &hello_nar(), None);
    let mut json = String::from("{\"version\":1,\"root\":");
    for _ in 0..100_000 {
        json.push_str("{\"type\":\"directory\",\"entries\":{\"d\":");
    }
    json.push_str("{\"type\":\"directory\",\"entries\":{}}");
    for _ in 0..100_000 {
        json.push_str("}}");
    }
    json.push('}');
    fs::write(dir.join(format!("{deep_ls}.ls")), &json).unwrap();

    // A 300 MiB `.ls` (valid JSON: an empty root padded with whitespace).
    let huge_ls = put(&dir, 3, "huge-ls", &hello_nar(), None);
    {
        let mut f = fs::File::create(dir.join(format!("{huge_ls}.ls"))).unwrap();
        f.write_all(b"{\"version\":1,\"root\":{\"type\":\"directory\",\"entries\":{}}}")
            .unwrap();
        let spaces = vec![b' '; 1 << 20];
        for _ in 0..300 {
            f.write_all(&spaces).unwrap();
        }
    }

    // A `.ls` whose names escape the tree and whose offsets overflow.
    let evil_ls = put(&dir, 4, "evil-ls", &hello_nar(), None);
    fs::write(
        dir.join(format!("{evil_ls}.ls")),
        format!(
            "{{\"version\":1,\"root\":{{\"type\":\"directory\",\"entries\":{{\"..\":{{\"type\":\"regular\",\"size\":18446744073709551615,\"narOffset\":18446744073709551615}},\"hello\":{{\"type\":\"regular\",\"size\":3,\"narOffset\":{}}}}}}}}}",
            u64::MAX
        ),
    )
    .unwrap();

    let d = Daemon::start(&env, &["serve", &format!("file://{}", dir.display())]);
    for o in [&deep_ls, &huge_ls, &evil_ls] {
        let (code, body) = get(&d, &format!("{o}/browse/"));
        assert_eq!(code, 200, "{o}: {body}");
        assert!(body.contains("hello"), "{o} lists the NAR's tree: {body}");
        let (code, body) = get(&d, &format!("{o}/browse/hello"));
        assert_eq!(code, 200, "{o}: {body}");
        assert!(body.contains("hi"), "{o}: {body}");
        assert_alive(&d, &good);
    }
    let (code, _) = curl(&[&format!("{}/{huge_ls}.ls", d.url)]);
    assert_eq!(code, 404, "an oversized .ls is refused");
    let peak = d.peak_rss_kib();
    assert!(peak < 150 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn oversized_narinfos_and_nar_bombs_are_errors_in_bounded_memory() {
    let env = NixEnv::new();
    let dir = cache(&env);
    let good = put(&dir, 1, "good", &hello_nar(), None);

    // A narinfo of 8 MiB: one long unknown field.
    let hello = hello_nar();
    let big = write_object(
        &dir,
        2,
        "big-narinfo",
        &xz(&hello),
        &nix32_sha256(&hello),
        hello.len() as u64,
        &format!("Extra: {}\n", "a".repeat(8 << 20)),
    );

    // A NAR that decompresses to 1 GiB (one file of zeros) while its narinfo says 4 KiB.
    const BOMB: u64 = 1 << 30;
    let mut head = Vec::new();
    toks(
        &mut head,
        &[b"nix-archive-1", b"(", b"type", b"regular", b"contents"],
    );
    head.extend_from_slice(&BOMB.to_le_bytes());
    let mut tail = Vec::new();
    tok(&mut tail, b")");
    let mut c = Command::new("xz")
        .args(["-c", "-0", "-T2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&head).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..BOMB >> 20 {
            stdin.write_all(&zeros).unwrap();
        }
        stdin.write_all(&tail).unwrap();
    });
    let out = c.wait_with_output().unwrap();
    writer.join().unwrap();
    let bomb = write_object(&dir, 3, "bomb", &out.stdout, &nix32_sha256(b""), 4096, "");

    let d = Daemon::start(&env, &["serve", &format!("file://{}", dir.display())]);
    let (code, _) = curl(&[&format!("{}/{big}.narinfo", d.url)]);
    assert_eq!(code, 404, "an 8 MiB narinfo is refused");
    let (code, body) = get(&d, &format!("{big}/browse/"));
    assert!(code >= 400 && body.contains("<html"), "{code}: {body}");
    assert_alive(&d, &good);

    let (code, body) = get(&d, &format!("{bomb}/browse/"));
    assert!(
        code == 502 && body.contains("<html"),
        "browse answered {code}: {body}"
    );
    let (code, _) = get(&d, &format!("{bomb}/file/"));
    assert!(code >= 400, "file answered {code}");
    assert!(d.logged("NarSize"), "the log says why");
    assert_alive(&d, &good);
    let peak = d.peak_rss_kib();
    assert!(peak < 150 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn a_bzip2_build_log_of_600_mib_is_streamed_in_bounded_memory() {
    let env = NixEnv::new();
    // Any path initialises the chroot store and its log folder.
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x").unwrap();
    env.add(&src);
    let drv = format!("{}-bomb.drv", digest(7));
    let dir = env
        .store_root()
        .join("nix/var/log/nix/drvs")
        .join(&drv[..2]);
    fs::create_dir_all(&dir).unwrap();
    // A build that printed 600 MiB of zeros: Nix keeps it as a few KiB of bzip2.
    const LOG: u64 = 600 << 20;
    let out = fs::File::create(dir.join(format!("{}.bz2", &drv[2..]))).unwrap();
    let mut c = Command::new("bzip2")
        .args(["-c", "-1"])
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .unwrap();
    {
        let mut stdin = c.stdin.take().unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..LOG >> 20 {
            stdin.write_all(&zeros).unwrap();
        }
    }
    assert!(c.wait().unwrap().success());

    let d = Daemon::start(&env, &["serve", &env.store_arg()]);
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ])
        .arg(format!("{}/log/{drv}", d.url))
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(got, format!("200 {LOG}"), "the whole log arrives");
    let peak = d.peak_rss_kib();
    assert!(peak < 150 * 1024, "peak RSS {peak} KiB");
    let (code, _) = curl(&[&format!("{}/healthz", d.url)]);
    assert_eq!(code, 200);
}

#[test]
fn a_directory_of_50000_entries_is_listed_a_page_at_a_time() {
    let env = NixEnv::new();
    let dir = cache(&env);
    let good = put(&dir, 1, "good", &hello_nar(), None);
    let mut nar = Vec::new();
    toks(&mut nar, &[b"nix-archive-1", b"(", b"type", b"directory"]);
    for i in 0..50_000 {
        let name = format!("f{i:06}");
        toks(
            &mut nar,
            &[
                b"entry",
                b"(",
                b"name",
                name.as_bytes(),
                b"node",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b")",
                b")",
            ],
        );
    }
    tok(&mut nar, b")");
    let wide = put(&dir, 2, "wide", &nar, None);
    let d = Daemon::start(&env, &["serve", &format!("file://{}", dir.display())]);
    let (code, body) = get(&d, &format!("{wide}/browse/"));
    assert_eq!(code, 200);
    assert!(body.contains("f009999"), "the first entries are listed");
    assert!(!body.contains("f010000"), "the rest is not");
    assert!(body.contains("40000 more entries"), "and the page says so");
    let (code, body) = get(&d, &format!("{wide}/browse/f049999"));
    assert_eq!(code, 200, "every entry can still be opened: {body}");
    assert_alive(&d, &good);
}
