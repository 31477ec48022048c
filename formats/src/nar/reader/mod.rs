//! A validating, streaming NAR reader.

use std::collections::BTreeMap;
use std::io::{self, Read};

use thiserror::Error;

use super::listing::{Listing, Node};
use super::{bad_name, padding, MAGIC, MAX_DEPTH, MAX_NODES, MAX_TARGET};

/// Longest token other than file contents that the reader accepts: the longest symlink
/// target ([`MAX_TARGET`]) with room to spare; names are checked against [`MAX_NAME`](super::MAX_NAME) after.
const MAX_TOKEN: u64 = 4096;

/// Why a byte stream is not a valid NAR.
#[derive(Debug, Error)]
pub enum NarError {
    /// Reading failed, or the stream ended early.
    #[error("reading NAR: {0}")]
    Io(#[from] io::Error),
    /// A token other than the one the format requires here.
    #[error("malformed NAR at byte {offset}: expected {expected}, found {found:?}")]
    Unexpected {
        /// Byte offset of the token.
        offset: u64,
        /// What the format requires.
        expected: &'static str,
        /// What was there (lossy).
        found: String,
    },
    /// A directory entry name that could escape, is too long or is out of order.
    #[error("malformed NAR at byte {offset}: bad entry name {name:?} ({why})")]
    BadName {
        /// Byte offset.
        offset: u64,
        /// The name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Non-zero padding or an absurd length.
    #[error("malformed NAR at byte {0}: corrupt padding or length")]
    Corrupt(u64),
    /// Directories nested deeper than [`MAX_DEPTH`].
    #[error(
        "refusing NAR: directories nested deeper than {MAX_DEPTH} levels at byte {0}; no real store path is that deep"
    )]
    TooDeep(u64),
    /// More than [`MAX_NODES`] files, directories and symlinks.
    #[error("refusing NAR: more than {MAX_NODES} entries at byte {0}")]
    TooManyNodes(u64),
    /// A symlink target longer than [`MAX_TARGET`].
    #[error("malformed NAR at byte {0}: symlink target longer than {MAX_TARGET} bytes")]
    TargetTooLong(u64),
    /// The archive runs past the size its narinfo gives (`NarSize`).
    #[error(
        "NAR is longer than its NarSize of {0} bytes; the cache holds a corrupt or hostile NAR"
    )]
    TooLong(u64),
}

/// Receives the contents of a NAR as it is read.
pub trait NarVisitor {
    /// A directory at `path` (bytes, `/`-separated, empty for the root).
    fn directory(&mut self, _path: &[u8]) -> io::Result<()> {
        Ok(())
    }
    /// A symlink.
    fn symlink(&mut self, _path: &[u8], _target: &[u8]) -> io::Result<()> {
        Ok(())
    }
    /// A regular file; `contents` yields exactly `size` bytes. Whatever the visitor leaves
    /// unread is skipped.
    fn file(
        &mut self,
        _path: &[u8],
        _executable: bool,
        _size: u64,
        _contents: &mut dyn Read,
    ) -> io::Result<()> {
        Ok(())
    }
}

/// A visitor that keeps nothing: reading with it only validates and lists.
impl NarVisitor for () {}

struct Tokens<R> {
    r: R,
    offset: u64,
    /// The most bytes the archive may take (its `NarSize`).
    max: u64,
}

impl<R: Read> Tokens<R> {
    /// Accounts for `n` more bytes, before they are read: a length that would run past the
    /// end the narinfo gives is refused without reading (or decompressing) a byte of it.
    fn advance(&mut self, n: u64) -> Result<(), NarError> {
        match self.offset.checked_add(n) {
            Some(end) if end <= self.max => {
                self.offset = end;
                Ok(())
            }
            Some(_) => Err(NarError::TooLong(self.max)),
            None => Err(NarError::Corrupt(self.offset)),
        }
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.advance(8)?;
        self.r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn skip_padding(&mut self, n: u64) -> Result<(), NarError> {
        let p = padding(n);
        let at = self.offset;
        self.advance(p)?;
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b[..p as usize])?;
        if b[..p as usize].iter().any(|&x| x != 0) {
            return Err(NarError::Corrupt(at));
        }
        Ok(())
    }

    fn bytes(&mut self) -> Result<Vec<u8>, NarError> {
        let at = self.offset;
        let n = self.u64()?;
        if n > MAX_TOKEN {
            return Err(NarError::Corrupt(at));
        }
        self.advance(n)?;
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v)?;
        self.skip_padding(n)?;
        Ok(v)
    }

    fn expect(&mut self, want: &'static str) -> Result<(), NarError> {
        let at = self.offset;
        let got = self.bytes()?;
        if got != want.as_bytes() {
            return Err(NarError::Unexpected {
                offset: at,
                expected: want,
                found: String::from_utf8_lossy(&got).into(),
            });
        }
        Ok(())
    }
}

/// Reads and validates a whole NAR, handing its contents to `visitor`; returns the listing.
///
/// Bounded whatever the input: directories nest at most [`MAX_DEPTH`] deep, at most
/// [`MAX_NODES`] nodes, names and targets as Nix allows them. The reader keeps its own stack,
/// so no input can overflow the thread's.
pub fn read<R: Read, V: NarVisitor + ?Sized>(r: R, visitor: &mut V) -> Result<Listing, NarError> {
    read_at_most(r, visitor, u64::MAX)
}

/// [`read`], refusing an archive longer than `nar_size` bytes (the narinfo's `NarSize`) as
/// soon as a length in it says so: a small compressed NAR cannot make the reader decompress
/// gigabytes its narinfo never announced.
pub fn read_at_most<R: Read, V: NarVisitor + ?Sized>(
    r: R,
    visitor: &mut V,
    nar_size: u64,
) -> Result<Listing, NarError> {
    read_limited(r, visitor, nar_size, MAX_NODES)
}

/// The reader, with the node bound a parameter so that tests can reach it cheaply.
fn read_limited<R: Read, V: NarVisitor + ?Sized>(
    r: R,
    visitor: &mut V,
    nar_size: u64,
    max_nodes: u64,
) -> Result<Listing, NarError> {
    let mut t = Tokens {
        r,
        offset: 0,
        max: nar_size,
    };
    t.expect(MAGIC)?;
    let mut path = Vec::new();
    let mut open: Vec<OpenDir> = Vec::new();
    let mut nodes = 0u64;
    loop {
        // At the start of a node (the root, or the one after an entry's "node").
        nodes += 1;
        if nodes > max_nodes {
            return Err(NarError::TooManyNodes(t.offset));
        }
        let mut done = match start_node(&mut t, visitor, &path)? {
            Started::Leaf(node) => Some(node),
            Started::Directory => {
                if open.len() >= MAX_DEPTH {
                    return Err(NarError::TooDeep(t.offset));
                }
                open.push(OpenDir {
                    entries: BTreeMap::new(),
                    name: Vec::new(),
                    path_len: path.len(),
                });
                None
            }
        };
        // Finish nodes and directories until an entry opens the next node.
        loop {
            if let Some(node) = done.take() {
                let Some(dir) = open.last_mut() else {
                    return Ok(Listing { root: node });
                };
                t.expect(")")?;
                path.truncate(dir.path_len);
                let name = std::mem::take(&mut dir.name);
                dir.entries.insert(name, node);
            }
            let dir = open.last_mut().expect("an open directory");
            let at = t.offset;
            let tag = t.bytes()?;
            match &tag[..] {
                b")" => {
                    let dir = open.pop().expect("an open directory");
                    done = Some(Node::Directory {
                        entries: dir.entries,
                    });
                }
                b"entry" => {
                    t.expect("(")?;
                    t.expect("name")?;
                    let at = t.offset;
                    let name = t.bytes()?;
                    let bad = |why| NarError::BadName {
                        offset: at,
                        name: String::from_utf8_lossy(&name).into(),
                        why,
                    };
                    if let Some(why) = bad_name(&name) {
                        return Err(bad(why));
                    }
                    if dir
                        .entries
                        .last_key_value()
                        .is_some_and(|(l, _)| *l >= name)
                    {
                        return Err(bad("entries not sorted or duplicated"));
                    }
                    t.expect("node")?;
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(&name);
                    dir.name = name;
                    break;
                }
                _ => {
                    return Err(NarError::Unexpected {
                        offset: at,
                        expected: "entry or )",
                        found: String::from_utf8_lossy(&tag).into(),
                    })
                }
            }
        }
    }
}

/// A directory whose entries are still being read.
struct OpenDir {
    entries: BTreeMap<Vec<u8>, Node>,
    /// The name of the entry being read.
    name: Vec<u8>,
    /// The length of the directory's own path, to cut back to after each entry.
    path_len: usize,
}

enum Started {
    /// A file or symlink, read to its closing `)`.
    Leaf(Node),
    /// A directory, whose entries follow.
    Directory,
}

/// Reads a node's header; a file or symlink whole, a directory up to its first entry.
fn start_node<R: Read, V: NarVisitor + ?Sized>(
    t: &mut Tokens<R>,
    v: &mut V,
    path: &[u8],
) -> Result<Started, NarError> {
    t.expect("(")?;
    t.expect("type")?;
    let at = t.offset;
    let ty = t.bytes()?;
    let node = match &ty[..] {
        b"symlink" => {
            t.expect("target")?;
            let at = t.offset;
            let target = t.bytes()?;
            if target.len() > MAX_TARGET {
                return Err(NarError::TargetTooLong(at));
            }
            v.symlink(path, &target)?;
            Node::Symlink { target }
        }
        b"regular" => {
            let at = t.offset;
            let mut tag = t.bytes()?;
            let mut executable = false;
            if tag == b"executable" {
                executable = true;
                t.expect("")?;
                tag = t.bytes()?;
            }
            if tag != b"contents" {
                return Err(NarError::Unexpected {
                    offset: at,
                    expected: "contents",
                    found: String::from_utf8_lossy(&tag).into(),
                });
            }
            let size = t.u64()?;
            let nar_offset = t.offset;
            t.advance(size)?;
            let mut contents = (&mut t.r).take(size);
            v.file(path, executable, size, &mut contents)?;
            io::copy(&mut contents, &mut io::sink())?;
            if contents.limit() != 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            t.skip_padding(size)?;
            Node::Regular {
                size,
                executable,
                nar_offset,
            }
        }
        b"directory" => {
            v.directory(path)?;
            return Ok(Started::Directory);
        }
        _ => {
            return Err(NarError::Unexpected {
                offset: at,
                expected: "regular, symlink or directory",
                found: String::from_utf8_lossy(&ty).into(),
            })
        }
    };
    t.expect(")")?;
    Ok(Started::Leaf(node))
}

#[cfg(test)]
mod tests;
