//! What the fuzz targets share: an allocation meter (so "memory stays bounded" is a checked
//! property, not a hope), an independent NAR serialiser to hold the reader to, and a visitor
//! that keeps what the reader reports.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use nixcached_formats::nar::{NarVisitor, Node};

/// Counts live heap bytes and their high-water mark. libFuzzer's `-malloc_limit_mb` catches
/// one huge allocation; this catches many small ones adding up past what the input justifies.
struct Meter;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live =
                    LIVE.fetch_add(new_size - layout.size(), Relaxed) + new_size - layout.size();
                PEAK.fetch_max(live, Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Runs `f` and returns its result with the most heap it held at once beyond what was live
/// before (its result included, when it is kept on the heap). Fuzzing runs one input at a
/// time on one thread, so nothing else allocates meanwhile.
pub fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let out = f();
    (out, PEAK.load(Relaxed) - base)
}

/// Heap bytes live now.
pub fn live_heap() -> usize {
    LIVE.load(Relaxed)
}

/// What the NAR reader reported through its visitor, by path, in visiting order.
#[derive(Debug, Default)]
pub struct Collected {
    /// Every node: (path, kind, data) where data is the file contents or symlink target.
    pub events: Vec<(Vec<u8>, &'static str, Vec<u8>)>,
}

impl NarVisitor for Collected {
    fn directory(&mut self, path: &[u8]) -> io::Result<()> {
        self.events.push((path.to_vec(), "directory", Vec::new()));
        Ok(())
    }
    fn symlink(&mut self, path: &[u8], target: &[u8]) -> io::Result<()> {
        self.events
            .push((path.to_vec(), "symlink", target.to_vec()));
        Ok(())
    }
    fn file(
        &mut self,
        path: &[u8],
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()> {
        let mut v = Vec::new();
        contents.read_to_end(&mut v)?;
        // Fewer bytes only on a truncated NAR, which the reader must then refuse.
        assert!(v.len() as u64 <= size, "visitor got more than size bytes");
        let kind = if executable { "executable" } else { "regular" };
        self.events.push((path.to_vec(), kind, v));
        Ok(())
    }
}

impl Collected {
    /// Contents of the file at `path`, as the visitor saw it.
    pub fn contents(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.events
            .iter()
            .filter(|(_, k, _)| *k == "regular" || *k == "executable")
            .map(|(p, _, c)| (p.clone(), c.clone()))
            .collect()
    }
}

fn token(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

/// Serialises a tree to NAR bytes, written from the format's definition (not from the
/// crate's writer), so reader and this writer can be held to each other: for any NAR the
/// reader accepts, `nar_of(listing) == the bytes it read`.
pub fn nar_of(root: &Node, contents: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    token(&mut out, b"nix-archive-1");
    node(&mut out, root, &mut Vec::new(), contents);
    out
}

fn node(out: &mut Vec<u8>, n: &Node, path: &mut Vec<u8>, contents: &BTreeMap<Vec<u8>, Vec<u8>>) {
    token(out, b"(");
    token(out, b"type");
    match n {
        Node::Regular {
            executable, size, ..
        } => {
            token(out, b"regular");
            if *executable {
                token(out, b"executable");
                token(out, b"");
            }
            token(out, b"contents");
            let c = &contents[path];
            assert_eq!(c.len() as u64, *size, "listing size differs from contents");
            token(out, c);
        }
        Node::Symlink { target } => {
            token(out, b"symlink");
            token(out, b"target");
            token(out, target);
        }
        Node::Directory { entries } => {
            token(out, b"directory");
            for (name, child) in entries {
                token(out, b"entry");
                token(out, b"(");
                token(out, b"name");
                token(out, name);
                token(out, b"node");
                let len = path.len();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(name);
                node(out, child, path, contents);
                path.truncate(len);
                token(out, b")");
            }
        }
    }
    token(out, b")");
}

/// Every regular file of a tree: (path, size, offset), in NAR order.
pub fn files(root: &Node) -> Vec<(Vec<u8>, u64, u64)> {
    fn walk(n: &Node, path: &mut Vec<u8>, out: &mut Vec<(Vec<u8>, u64, u64)>) {
        match n {
            Node::Regular {
                size, nar_offset, ..
            } => out.push((path.clone(), *size, *nar_offset)),
            Node::Symlink { .. } => {}
            Node::Directory { entries } => {
                for (name, child) in entries {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name);
                    walk(child, path, out);
                    path.truncate(len);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut Vec::new(), &mut out);
    out
}

/// Every node of a tree as (path, kind), in NAR order: what a visitor must be told.
pub fn kinds(root: &Node) -> Vec<(Vec<u8>, &'static str)> {
    fn walk(n: &Node, path: &mut Vec<u8>, out: &mut Vec<(Vec<u8>, &'static str)>) {
        match n {
            Node::Regular { executable, .. } => out.push((
                path.clone(),
                if *executable { "executable" } else { "regular" },
            )),
            Node::Symlink { .. } => out.push((path.clone(), "symlink")),
            Node::Directory { entries } => {
                out.push((path.clone(), "directory"));
                for (name, child) in entries {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name);
                    walk(child, path, out);
                    path.truncate(len);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut Vec::new(), &mut out);
    out
}

/// Whether every name and symlink target of the tree is UTF-8 (the only trees a JSON listing
/// carries unchanged).
pub fn all_utf8(n: &Node) -> bool {
    match n {
        Node::Regular { .. } => true,
        Node::Symlink { target } => std::str::from_utf8(target).is_ok(),
        Node::Directory { entries } => entries
            .iter()
            .all(|(k, v)| std::str::from_utf8(k).is_ok() && all_utf8(v)),
    }
}
