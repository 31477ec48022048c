//! Structure-aware NAR target: an arbitrary file tree is put on disk, archived by the crate's
//! writer (`nar::dump`), its streaming form (`Dumper`, in arbitrary chunk sizes) and its
//! metadata-only listing (`nar::listing`), then read back. All must agree with each other,
//! with an independent serialiser, and with the tree that was described. A raw byte fuzzer
//! rarely gets past the NAR's framing; this one starts inside it.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nixcached_formats::nar::{self, Dumper, Node};
use nixcached_fuzz::{nar_of, Collected};

#[derive(Arbitrary, Debug)]
enum Tree {
    File { executable: bool, contents: Vec<u8> },
    Link(Vec<u8>),
    Dir(Vec<(Vec<u8>, Tree)>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    root: Tree,
    /// Buffer sizes handed to `Dumper::fill`, cycled.
    chunks: Vec<u16>,
}

/// Makes a byte string a name a directory can hold (what the NAR format allows too).
fn name_of(raw: &[u8]) -> Vec<u8> {
    let mut n: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|&b| b != b'/' && b != 0)
        .take(255)
        .collect();
    if n.is_empty() || n == b"." || n == b".." {
        n.insert(0, b'n');
    }
    n.truncate(255);
    n
}

/// Writes the tree under `at`; returns the node the NAR must list, without offsets.
fn materialise(t: &Tree, at: &Path, depth: usize) -> Node {
    match t {
        Tree::File {
            executable,
            contents,
        } => {
            std::fs::write(at, contents).unwrap();
            let mode = if *executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode)).unwrap();
            Node::Regular {
                size: contents.len() as u64,
                executable: *executable,
                nar_offset: 0,
            }
        }
        // A file system cannot hold an empty or NUL-bearing target; bounded as Nix bounds it.
        Tree::Link(raw) => {
            let mut target: Vec<u8> = raw.iter().copied().filter(|&b| b != 0).take(4095).collect();
            if target.is_empty() {
                target.push(b't');
            }
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), at).unwrap();
            Node::Symlink { target }
        }
        Tree::Dir(entries) => {
            std::fs::create_dir(at).unwrap();
            let mut listed = BTreeMap::new();
            let mut names = BTreeSet::new();
            for (raw, child) in entries {
                let name = name_of(raw);
                // Deep trees are legal but only slow the fuzzer down: files stop them.
                if depth >= 20 || !names.insert(name.clone()) {
                    continue;
                }
                let node = materialise(
                    child,
                    &at.join(std::ffi::OsStr::from_bytes(&name)),
                    depth + 1,
                );
                listed.insert(name, node);
            }
            Node::Directory { entries: listed }
        }
    }
}

/// The node with every `nar_offset` zeroed, to compare shape, names, sizes and modes.
fn shape(n: &Node) -> Node {
    match n {
        Node::Regular {
            size, executable, ..
        } => Node::Regular {
            size: *size,
            executable: *executable,
            nar_offset: 0,
        },
        Node::Symlink { target } => Node::Symlink {
            target: target.clone(),
        },
        Node::Directory { entries } => Node::Directory {
            entries: entries.iter().map(|(k, v)| (k.clone(), shape(v))).collect(),
        },
    }
}

fuzz_target!(|input: Input| {
    let dir = tempfile::Builder::new()
        .prefix("nar-tree")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let root = dir.path().join("root");
    let described = materialise(&input.root, &root, 0);

    let mut bytes = Vec::new();
    let listing = nar::dump(&root, &mut bytes).expect("dump");
    assert_eq!(
        shape(&listing.root),
        described,
        "dump lists another tree than was written"
    );
    assert_eq!(
        nar::listing(&root).expect("listing"),
        listing,
        "listing() and dump() disagree"
    );

    // The streaming dumper writes the same bytes whatever buffer sizes it is given.
    let mut dumper = Dumper::new(root.clone());
    let mut streamed = Vec::new();
    let mut chunks = input
        .chunks
        .iter()
        .map(|&c| 1 + c as usize % 70_000)
        .cycle();
    while !dumper.is_done() {
        let mut buf = Vec::new();
        dumper
            .fill(&mut buf, chunks.next().unwrap_or(65_536))
            .expect("fill");
        streamed.extend_from_slice(&buf);
    }
    assert!(streamed == bytes, "Dumper and dump() wrote different NARs");

    let mut seen = Collected::default();
    let read = nar::read(&bytes[..], &mut seen).expect("the reader refuses the writer's NAR");
    assert_eq!(read, listing, "reader and writer list different trees");
    assert!(
        nar_of(&read.root, &seen.contents()) == bytes,
        "independent serialiser disagrees"
    );
    assert_eq!(
        nar::read_at_most(&bytes[..], &mut (), bytes.len() as u64).expect("NarSize fits"),
        listing
    );
});
