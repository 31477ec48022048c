//! A validating, streaming NAR reader.

use std::collections::BTreeMap;
use std::io::{self, Read};

use thiserror::Error;

use super::listing::{Listing, Node};
use super::{padding, MAGIC};

/// Longest token other than file contents that the reader accepts (names, link targets).
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
    /// A directory entry name that could escape or is out of order.
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
}

impl<R: Read> Tokens<R> {
    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        self.offset += 8;
        Ok(u64::from_le_bytes(b))
    }

    fn skip_padding(&mut self, n: u64) -> Result<(), NarError> {
        let p = padding(n) as usize;
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b[..p])?;
        if b[..p].iter().any(|&x| x != 0) {
            return Err(NarError::Corrupt(self.offset));
        }
        self.offset += p as u64;
        Ok(())
    }

    fn bytes(&mut self) -> Result<Vec<u8>, NarError> {
        let at = self.offset;
        let n = self.u64()?;
        if n > MAX_TOKEN {
            return Err(NarError::Corrupt(at));
        }
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v)?;
        self.offset += n;
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
pub fn read<R: Read, V: NarVisitor + ?Sized>(r: R, visitor: &mut V) -> Result<Listing, NarError> {
    let mut t = Tokens { r, offset: 0 };
    t.expect(MAGIC)?;
    let mut path = Vec::new();
    let root = node(&mut t, visitor, &mut path)?;
    Ok(Listing { root })
}

fn node<R: Read, V: NarVisitor + ?Sized>(
    t: &mut Tokens<R>,
    v: &mut V,
    path: &mut Vec<u8>,
) -> Result<Node, NarError> {
    t.expect("(")?;
    t.expect("type")?;
    let at = t.offset;
    let ty = t.bytes()?;
    let node = match &ty[..] {
        b"symlink" => {
            t.expect("target")?;
            let target = t.bytes()?;
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
            let mut contents = (&mut t.r).take(size);
            v.file(path, executable, size, &mut contents)?;
            io::copy(&mut contents, &mut io::sink())?;
            if contents.limit() != 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            t.offset += size;
            t.skip_padding(size)?;
            Node::Regular {
                size,
                executable,
                nar_offset,
            }
        }
        b"directory" => {
            v.directory(path)?;
            let mut entries = BTreeMap::new();
            let mut last: Option<Vec<u8>> = None;
            loop {
                let at = t.offset;
                let tag = t.bytes()?;
                match &tag[..] {
                    b")" => return Ok(Node::Directory { entries }),
                    b"entry" => {}
                    _ => {
                        return Err(NarError::Unexpected {
                            offset: at,
                            expected: "entry or )",
                            found: String::from_utf8_lossy(&tag).into(),
                        })
                    }
                }
                t.expect("(")?;
                t.expect("name")?;
                let at = t.offset;
                let name = t.bytes()?;
                let bad = |why| NarError::BadName {
                    offset: at,
                    name: String::from_utf8_lossy(&name).into(),
                    why,
                };
                if name.is_empty() || name == b"." || name == b".." {
                    return Err(bad("reserved name"));
                }
                if name.contains(&b'/') || name.contains(&0) {
                    return Err(bad("contains '/' or NUL"));
                }
                if last.as_ref().is_some_and(|l| *l >= name) {
                    return Err(bad("entries not sorted or duplicated"));
                }
                t.expect("node")?;
                let len = path.len();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(&name);
                let child = node(t, v, path)?;
                path.truncate(len);
                t.expect(")")?;
                last = Some(name.clone());
                entries.insert(name, child);
            }
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
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::super::dump;
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

    #[test]
    fn reader_rejects_traversal_names() {
        fn s(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
            out.extend(std::iter::repeat_n(
                0,
                super::super::padding(b.len() as u64) as usize,
            ));
        }
        for name in [&b".."[..], b"a/b", b"", b"."] {
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
}
