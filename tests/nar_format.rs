//! The NAR writer and reader against `nix-store --dump`, on trees made here.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::NixEnv;
use nixcached_actors::formats::nar;
use sha2::{Digest, Sha256};

fn ours(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    nar::dump(path, &mut out).unwrap();
    out
}

fn assert_same_as_nix(env: &NixEnv, path: &Path) {
    let theirs = env.dump(path);
    let mine = ours(path);
    assert!(
        theirs == mine,
        "NAR of {} differs from nix-store --dump ({} vs {} bytes)",
        path.display(),
        mine.len(),
        theirs.len()
    );
    // And the reader accepts what Nix wrote, with the same listing as the writer's.
    let listing = nar::read(&theirs[..], &mut ()).unwrap();
    assert_eq!(listing, nar::dump(path, &mut std::io::sink()).unwrap());
}

#[test]
fn regular_files_executables_and_symlinks() {
    let env = NixEnv::new();
    let t = env.path("t1");
    fs::create_dir_all(&t).unwrap();
    let f = t.join("file");
    fs::write(&f, "Hello, World!\n").unwrap();
    assert_same_as_nix(&env, &f);
    let e = t.join("exe");
    fs::write(&e, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&e, fs::Permissions::from_mode(0o755)).unwrap();
    assert_same_as_nix(&env, &e);
    let empty = t.join("empty");
    fs::write(&empty, "").unwrap();
    assert_same_as_nix(&env, &empty);
    for (i, len) in [1usize, 7, 8, 9, 4095, 4096, 65537].into_iter().enumerate() {
        let p = t.join(format!("len{i}"));
        fs::write(&p, vec![0xa5u8; len]).unwrap();
        assert_same_as_nix(&env, &p);
    }
    let l = t.join("link");
    symlink("../some/where else", &l).unwrap();
    assert_same_as_nix(&env, &l);
}

#[test]
fn directories_deep_trees_empty_dirs_and_odd_names() {
    let env = NixEnv::new();
    let t = env.path("tree");
    fs::create_dir_all(t.join("empty")).unwrap();
    let mut deep = t.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), "bottom\n").unwrap();
    // Sorting is by bytes: upper case before lower, and multi-byte names last.
    for name in [
        "B",
        "a",
        "a.b",
        "a-b",
        "Zz",
        "with space",
        "ünïcödé",
        "new\nline",
        "tab\tname",
    ] {
        fs::write(t.join(name), name).unwrap();
    }
    fs::write(t.join(OsStr::from_bytes(b"latin1-\xe9")), "not utf-8").unwrap();
    symlink("a", t.join("link-to-a")).unwrap();
    symlink("/dangling/absolute", t.join("dangling")).unwrap();
    let x = t.join("bin");
    fs::create_dir_all(&x).unwrap();
    fs::write(x.join("tool"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(x.join("tool"), fs::Permissions::from_mode(0o555)).unwrap();
    for i in 0..300 {
        fs::write(t.join(format!("many-{i:03}")), format!("{i}")).unwrap();
    }
    assert_same_as_nix(&env, &t);
}

#[test]
fn several_gib_file_streams_identically() {
    // A sparse file costs no disk; both sides still read every byte.
    let env = NixEnv::new();
    let p = env.path("big");
    let f = fs::File::create(&p).unwrap();
    let size: u64 = 3 * 1024 * 1024 * 1024 + 5;
    f.set_len(size).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    let mut f = f;
    f.seek(SeekFrom::Start(size - 5)).unwrap();
    f.write_all(b"tail!").unwrap();
    drop(f);

    let mut child = env
        .cmd("nix-store")
        .args(["--dump", p.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut theirs = Sha256::new();
    let mut theirs_len = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = child.stdout.take().unwrap();
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        theirs.update(&buf[..n]);
        theirs_len += n as u64;
    }
    assert!(child.wait().unwrap().success());

    struct HashWriter(Sha256, u64);
    impl std::io::Write for HashWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.update(b);
            self.1 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut mine = HashWriter(Sha256::new(), 0);
    nar::dump(&p, &mut mine).unwrap();
    assert_eq!(mine.1, theirs_len);
    assert_eq!(mine.0.finalize(), theirs.finalize());
    assert!(theirs_len > size);
}

#[test]
fn async_stream_matches_and_listing_matches_nix_ls() {
    let env = NixEnv::new();
    let t = env.path("tree");
    fs::create_dir_all(t.join("sub/empty")).unwrap();
    fs::write(t.join("a"), "a\n").unwrap();
    fs::write(t.join("sub/b"), vec![1u8; 300_000]).unwrap();
    fs::write(t.join("x"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(t.join("x"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("sub/b", t.join("l")).unwrap();
    let sp = env.add(&t);
    let cache = env.path("cache");
    env.copy_to(
        &format!(
            "file://{}?compression=none&write-nar-listing=true",
            cache.display()
        ),
        &[&sp],
    );
    let digest = &sp["/nix/store/".len()..][..32];
    let nix_ls = fs::read_to_string(cache.join(format!("{digest}.ls"))).unwrap();
    let listing = nar::dump(&env.real(&sp), &mut std::io::sink()).unwrap();
    assert_eq!(
        listing.to_json(),
        nix_ls,
        "listing must be byte-identical to Nix's .ls"
    );
    assert_eq!(nar::Listing::from_json(&nix_ls).unwrap(), listing);

    let streamed = common::block_on(async {
        use futures::StreamExt;
        let mut s = nar::dump_stream(env.real(&sp));
        let mut v = Vec::new();
        while let Some(c) = s.next().await {
            v.extend_from_slice(&c.unwrap());
        }
        v
    });
    assert!(streamed == env.dump(&env.real(&sp)));
}

#[test]
fn reader_rejects_nars_nix_would_reject() {
    let env = NixEnv::new();
    let f = env.path("f");
    fs::write(&f, "content").unwrap();
    let good = env.dump(&f);
    assert!(nar::read(&good[..], &mut ()).is_ok());
    assert!(
        nar::read(&good[..good.len() - 8], &mut ()).is_err(),
        "truncated"
    );
    let mut bad_magic = good.clone();
    bad_magic[8] = b'X';
    assert!(nar::read(&bad_magic[..], &mut ()).is_err(), "bad magic");
}
