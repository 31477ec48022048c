//! A NAR produced on demand, piece by piece: each [`Dumper::fill`] does a bounded amount of
//! blocking file-system work and appends up to about the bytes asked for.
//!
//! This is what lets a server stream a NAR without a thread per client: the consumer pulls
//! the next piece when it has room, so a client that stops reading costs one piece of memory
//! and no thread. The walk is iterative (an explicit stack of what is left to write), so no
//! tree is deep enough to overflow the stack, and its bytes are those of [`super::dump`].

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{padding, MAGIC};

/// What is left to write, innermost last.
enum Task {
    /// Bytes ready to go (tokens of a node's header or trailer).
    Raw(Vec<u8>),
    /// A node: its type and what follows depend on what is at the path.
    Node(PathBuf),
    /// The rest of a regular file's contents.
    Contents {
        file: File,
        path: PathBuf,
        left: u64,
        size: u64,
    },
}

/// A NAR of a file-system tree, produced as it is pulled.
pub struct Dumper {
    todo: Vec<Task>,
}

/// Appends a NAR string token: length, bytes, padding.
fn token(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(&[0u8; 8][..padding(s.len() as u64) as usize]);
}

fn tokens(ts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for t in ts {
        token(&mut v, t);
    }
    v
}

impl Dumper {
    /// A NAR of what is at `path` (nothing is read yet).
    pub fn new(path: PathBuf) -> Dumper {
        Dumper {
            todo: vec![Task::Node(path), Task::Raw(tokens(&[MAGIC.as_bytes()]))],
        }
    }

    /// True once every byte has been produced.
    pub fn is_done(&self) -> bool {
        self.todo.is_empty()
    }

    /// Appends the next bytes of the NAR to `out`, stopping once `out` holds at least `max`
    /// bytes or the NAR is complete. Blocks on file-system calls: run it where blocking is
    /// allowed. An error (a file that changed size, something a NAR cannot hold) leaves the
    /// NAR unfinished; the caller must not treat what came before as a whole NAR.
    pub fn fill(&mut self, out: &mut Vec<u8>, max: usize) -> io::Result<()> {
        while out.len() < max {
            let Some(task) = self.todo.pop() else {
                return Ok(());
            };
            match task {
                Task::Raw(bytes) => out.extend_from_slice(&bytes),
                Task::Node(path) => self.node(path, out)?,
                Task::Contents {
                    mut file,
                    path,
                    left,
                    size,
                } => {
                    let want = left.min((max - out.len()) as u64) as usize;
                    let start = out.len();
                    out.resize(start + want, 0);
                    let n = read_some(&mut file, &mut out[start..])?;
                    out.truncate(start + n);
                    if n == 0 && want > 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{} shrank while it was being archived", path.display()),
                        ));
                    }
                    let left = left - n as u64;
                    if left > 0 {
                        self.todo.push(Task::Contents {
                            file,
                            path,
                            left,
                            size,
                        });
                    } else {
                        out.extend_from_slice(&[0u8; 8][..padding(size) as usize]);
                        token(out, b")");
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a node's header and queues the rest of it.
    fn node(&mut self, path: PathBuf, out: &mut Vec<u8>) -> io::Result<()> {
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        token(out, b"(");
        token(out, b"type");
        if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            token(out, b"symlink");
            token(out, b"target");
            token(out, target.as_os_str().as_bytes());
            token(out, b")");
        } else if ft.is_file() {
            token(out, b"regular");
            if meta.permissions().mode() & 0o100 != 0 {
                token(out, b"executable");
                token(out, b"");
            }
            token(out, b"contents");
            let size = meta.len();
            out.extend_from_slice(&size.to_le_bytes());
            let file = File::open(&path)?;
            self.todo.push(Task::Contents {
                file,
                path,
                left: size,
                size,
            });
        } else if ft.is_dir() {
            token(out, b"directory");
            let mut names: Vec<Vec<u8>> = fs::read_dir(&path)?
                .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
                .collect::<io::Result<_>>()?;
            names.sort();
            // The directory's closing token, then its entries in reverse: popped in order.
            self.todo.push(Task::Raw(tokens(&[b")"])));
            for name in names.into_iter().rev() {
                let child = path.join(std::ffi::OsStr::from_bytes(&name));
                self.todo.push(Task::Raw(tokens(&[b")"])));
                self.todo.push(Task::Node(child));
                self.todo.push(Task::Raw(tokens(&[
                    b"entry", b"(", b"name", &name, b"node",
                ])));
            }
        } else {
            return Err(not_archivable(&path));
        }
        Ok(())
    }
}

/// Reads what is there, retrying interruptions.
fn read_some(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn not_archivable(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is neither a file, a directory nor a symlink; a NAR cannot hold it",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a/b/c")).unwrap();
        fs::write(r.join("a/b/c/f"), b"hello").unwrap();
        fs::write(r.join("big"), vec![7u8; 300_001]).unwrap();
        fs::write(r.join("empty"), b"").unwrap();
        fs::write(r.join("x"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(r.join("x"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a/b", r.join("link")).unwrap();
        d
    }

    fn pulled(path: &Path, piece: usize) -> Vec<u8> {
        let mut d = Dumper::new(path.to_owned());
        let mut all = Vec::new();
        while !d.is_done() {
            let mut out = Vec::new();
            d.fill(&mut out, piece).unwrap();
            assert!(!out.is_empty() || d.is_done());
            all.extend_from_slice(&out);
        }
        all
    }

    #[test]
    fn pulled_in_any_piece_size_it_is_the_nar_dump_writes() {
        let t = tree();
        let mut want = Vec::new();
        super::super::dump(t.path(), &mut want).unwrap();
        for piece in [1, 7, 8, 4096, 65536, 1 << 20] {
            assert_eq!(pulled(t.path(), piece), want, "pieces of {piece}");
        }
        let file = t.path().join("big");
        let mut want = Vec::new();
        super::super::dump(&file, &mut want).unwrap();
        assert_eq!(pulled(&file, 1000), want);
    }

    #[test]
    fn a_deep_tree_is_walked_without_recursion() {
        // As deep as PATH_MAX lets a tree be addressed with 1-character names.
        let t = tempfile::tempdir().unwrap();
        let mut cur = t.path().to_owned();
        for _ in 0..1500 {
            cur.push("d");
            fs::create_dir(&cur).unwrap();
        }
        let mut want = Vec::new();
        super::super::dump(t.path(), &mut want).unwrap();
        assert_eq!(pulled(t.path(), 1 << 16), want);
    }

    #[test]
    fn a_file_that_changes_size_fails_the_nar() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, vec![1u8; 100]).unwrap();
        let mut d = Dumper::new(f.clone());
        let mut out = Vec::new();
        d.fill(&mut out, 64).unwrap();
        fs::write(&f, vec![1u8; 10]).unwrap();
        let mut rest = Vec::new();
        let err = d.fill(&mut rest, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("shrank"), "{err}");
    }
}
