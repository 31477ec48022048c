use super::super::{dump, MAX_NAME};
use super::*;
use std::os::unix::fs::PermissionsExt;

fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    std::fs::create_dir_all(r.join("t/sub/empty")).unwrap();
    std::fs::write(r.join("t/hello.txt"), b"Hello, World!\n").unwrap();
    std::fs::write(r.join("t/sub/x"), vec![7u8; 100_001]).unwrap();
    std::fs::write(r.join("t/run"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(r.join("t/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("hello.txt", r.join("t/link")).unwrap();
    d
}

#[test]
fn reader_accepts_what_writer_writes_and_agrees_on_listing() {
    let d = tree();
    let mut nar = Vec::new();
    let written = dump(&d.path().join("t"), &mut nar).unwrap();
    let read_back = read(&nar[..], &mut ()).unwrap();
    assert_eq!(written, read_back);
    // narOffset points at the contents.
    if let Some(Node::Regular {
        nar_offset, size, ..
    }) = written.root.lookup("hello.txt")
    {
        let o = *nar_offset as usize;
        assert_eq!(&nar[o..o + *size as usize], b"Hello, World!\n");
    } else {
        panic!("hello.txt missing");
    }
}

#[test]
fn single_file_offset_matches_original() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("f");
    std::fs::write(&f, b"Hello, World!\n").unwrap();
    let mut nar = Vec::new();
    let l = dump(&f, &mut nar).unwrap();
    assert_eq!(
        l.to_json(),
        r#"{"version":1,"root":{"type":"regular","size":14,"narOffset":96}}"#
    );
}

#[test]
fn reader_rejects_every_truncation_and_corruption() {
    let d = tree();
    let mut nar = Vec::new();
    dump(&d.path().join("t"), &mut nar).unwrap();
    for cut in (0..nar.len()).step_by(97) {
        assert!(read(&nar[..cut], &mut ()).is_err(), "truncated at {cut}");
    }
    let mut bad = nar.clone();
    bad[20] ^= 0xff;
    assert!(read(&bad[..], &mut ()).is_err());
}

fn s(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
    out.extend(std::iter::repeat_n(
        0,
        super::super::padding(b.len() as u64) as usize,
    ));
}

fn toks(out: &mut Vec<u8>, all: &[&[u8]]) {
    for t in all {
        s(out, t);
    }
}

/// `depth` directories, each holding the next as `d`, built without recursion.
fn deep(depth: usize) -> Vec<u8> {
    let mut n = Vec::new();
    s(&mut n, b"nix-archive-1");
    for _ in 0..depth - 1 {
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
    for _ in 0..depth - 1 {
        toks(&mut n, &[b")", b")"]);
    }
    n
}

/// A directory of `n` empty files.
fn wide(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    toks(&mut out, &[b"nix-archive-1", b"(", b"type", b"directory"]);
    for i in 0..n {
        let name = format!("{i:08}");
        toks(
            &mut out,
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
    s(&mut out, b")");
    out
}

/// A root symlink to `target`.
fn link(target: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    toks(
        &mut n,
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            target,
            b")",
        ],
    );
    n
}

/// A root file announcing `size` bytes followed by `body`.
fn file_of(size: u64, body: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    toks(
        &mut n,
        &[b"nix-archive-1", b"(", b"type", b"regular", b"contents"],
    );
    n.extend_from_slice(&size.to_le_bytes());
    n.extend_from_slice(body);
    n
}

#[test]
fn depth_is_bounded_without_recursion() {
    let l = read(&deep(MAX_DEPTH)[..], &mut ()).unwrap();
    let path = vec!["d"; MAX_DEPTH - 1].join("/");
    assert!(l.root.lookup(&path).is_some());
    // The deepest accepted listing renders, parses, compares and drops within half a
    // thread's default stack.
    std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(move || {
            let json = l.to_json();
            assert_eq!(Listing::from_json(&json).unwrap(), l);
            drop(l);
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(matches!(
        read(&deep(MAX_DEPTH + 1)[..], &mut ()),
        Err(NarError::TooDeep(_))
    ));
    // Far deeper than any stack could recurse: refused, on a small stack too.
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let e = read(&deep(100_000)[..], &mut ()).unwrap_err();
            assert!(matches!(e, NarError::TooDeep(_)), "{e}");
            assert!(e.to_string().contains("deeper than 256"), "{e}");
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn names_targets_and_node_counts_are_bounded() {
    for (len, ok) in [(MAX_NAME, true), (MAX_NAME + 1, false)] {
        let name = vec![b'n'; len];
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
                &name,
                b"node",
                b"(",
                b"type",
                b"directory",
                b")",
                b")",
                b")",
            ],
        );
        let r = read(&n[..], &mut ());
        assert_eq!(r.is_ok(), ok, "name of {len} bytes: {r:?}");
        if !ok {
            assert!(matches!(r, Err(NarError::BadName { .. })));
        }
    }
    assert!(read(&link(&vec![b'x'; MAX_TARGET])[..], &mut ()).is_ok());
    assert!(matches!(
        read(&link(&vec![b'x'; MAX_TARGET + 1])[..], &mut ()),
        Err(NarError::TargetTooLong(_))
    ));
    // The root directory and 99 files are 100 nodes.
    assert!(read_limited(&wide(99)[..], &mut (), u64::MAX, 100).is_ok());
    assert!(matches!(
        read_limited(&wide(100)[..], &mut (), u64::MAX, 100),
        Err(NarError::TooManyNodes(_))
    ));
}

#[test]
fn sizes_are_checked_before_reading() {
    // A file announcing more than the narinfo's NarSize is refused at its header.
    let e = read_at_most(&file_of(1 << 40, b"")[..], &mut (), 4096).unwrap_err();
    assert!(matches!(e, NarError::TooLong(4096)), "{e}");
    assert!(e.to_string().contains("NarSize"), "{e}");
    // A size near u64::MAX overflows the offset: refused, no panic.
    for size in [u64::MAX, u64::MAX - 7, u64::MAX - 100] {
        assert!(read(&file_of(size, b"abc")[..], &mut ()).is_err());
    }
    // Truncated contents.
    assert!(matches!(
        read(&file_of(100, b"abc")[..], &mut ()),
        Err(NarError::Io(_))
    ));
    // A token length beyond any name or target.
    let mut n = Vec::new();
    s(&mut n, b"nix-archive-1");
    n.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(read(&n[..], &mut ()), Err(NarError::Corrupt(_))));
    // The exact size passes; a byte less does not.
    let whole = link(b"x");
    let len = whole.len() as u64;
    assert!(read_at_most(&whole[..], &mut (), len).is_ok());
    assert!(matches!(
        read_at_most(&whole[..], &mut (), len - 1),
        Err(NarError::TooLong(_))
    ));
}

#[test]
fn reader_rejects_traversal_names() {
    for name in [&b".."[..], b"a/b", b"", b".", b"a\0b"] {
        let mut n = Vec::new();
        for tok in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"x",
            b")",
            b")",
            b")",
        ] {
            s(&mut n, tok);
        }
        assert!(
            matches!(read(&n[..], &mut ()), Err(NarError::BadName { .. })),
            "{name:?}"
        );
    }
}
