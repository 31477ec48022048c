//! What `upload` writes: the same store path gives byte-identical NAR files run after run, and
//! they are no larger than the ones `nix copy` writes at the same compression.

mod common;

use std::fs;
use std::path::Path;

use common::NixEnv;

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

/// Text-like bytes that compress, but not trivially (a fixed xorshift stream).
fn sample(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"abcdefghij /\n0123"[(x % 17) as usize]
        })
        .collect()
}

/// A store path of about 5 MB in 61 files, so its NAR arrives in many pieces.
fn bulky_path(env: &NixEnv) -> String {
    let d = env.path("bulky");
    fs::create_dir_all(d.join("share")).unwrap();
    for i in 0..60 {
        fs::write(d.join(format!("share/f{i}")), sample(50_000, i + 1)).unwrap();
    }
    fs::write(d.join("big"), sample(2 << 20, 99)).unwrap();
    env.add(&d)
}

/// Uploads `path` into a fresh folder cache `dest` with `compression`.
fn upload(env: &NixEnv, path: &str, dest: &Path, compression: &str) {
    let input = env.path(&common::peers::fresh_name("paths"));
    fs::write(&input, format!("{path}\n")).unwrap();
    let out = env
        .cmd(BIN)
        .args(["upload", "--input", input.to_str().unwrap()])
        .args(["--progress-interval", "0", "--jobs", "1"])
        .args(["--compression", compression])
        .args([
            "--state-dir",
            env.path(&common::peers::fresh_name("state"))
                .to_str()
                .unwrap(),
        ])
        .args(["--from", &format!("local?root={}", env.store_arg())])
        .arg(format!("file://{}", dest.display()))
        .output()
        .unwrap();
    common::assert_succeeded(&out);
}

/// The only NAR file in the folder cache `dest`: its name and bytes.
fn the_nar(dest: &Path) -> (String, Vec<u8>) {
    let files: Vec<_> = fs::read_dir(dest.join("nar"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    (name, fs::read(&files[0]).unwrap())
}

/// The `FileHash:` line of the narinfo of `path` in `dest`.
fn file_hash(dest: &Path, path: &str) -> String {
    let digest = &path["/nix/store/".len()..][..32];
    let text = fs::read_to_string(dest.join(format!("{digest}.narinfo"))).unwrap();
    text.lines()
        .find(|l| l.starts_with("FileHash: "))
        .unwrap()
        .to_owned()
}

#[test]
fn the_same_path_gives_the_same_nar_file_every_run_no_larger_than_nix_copy() {
    let env = NixEnv::new();
    let path = bulky_path(&env);
    for compression in ["xz", "zstd", "bzip2"] {
        let runs: Vec<_> = (0..3)
            .map(|i| {
                let dest = env.path(&format!("{compression}-{i}"));
                upload(&env, &path, &dest, compression);
                (the_nar(&dest), file_hash(&dest, &path))
            })
            .collect();
        let ((name, bytes), hash) = &runs[0];
        for ((n, b), h) in &runs[1..] {
            assert_eq!(n, name, "{compression}: NAR file names differ");
            assert_eq!(h, hash, "{compression}: FileHash differs between runs");
            assert!(
                b == bytes,
                "{compression}: NAR files differ between runs ({} and {} bytes)",
                b.len(),
                bytes.len()
            );
        }
        let nix_dest = env.path(&format!("{compression}-nix"));
        env.copy_to(
            &format!("file://{}?compression={compression}", nix_dest.display()),
            &[&path],
        );
        let (_, nix_bytes) = the_nar(&nix_dest);
        eprintln!(
            "{compression}: upload {} bytes, nix copy {} bytes",
            bytes.len(),
            nix_bytes.len()
        );
        assert!(
            bytes.len() <= nix_bytes.len(),
            "{compression}: upload wrote {} bytes, nix copy {}",
            bytes.len(),
            nix_bytes.len()
        );
    }
}
