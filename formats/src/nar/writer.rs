//! Serialising a file-system tree as a NAR, byte-identical to `nix-store --dump`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::listing::{Listing, Node};
use super::{padding, MAGIC};

/// Counts what passes so that file contents can be given their NAR offset.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
    /// False when only offsets are wanted: file contents are then counted, not read.
    contents: bool,
}

impl<W: Write> Counting<'_, W> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn u64(&mut self, n: u64) -> io::Result<()> {
        self.bytes(&n.to_le_bytes())
    }

    fn pad(&mut self, n: u64) -> io::Result<()> {
        let p = padding(n) as usize;
        self.bytes(&[0u8; 8][..p])
    }

    fn str(&mut self, s: &[u8]) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s)?;
        self.pad(s.len() as u64)
    }
}

/// Writes the NAR of `path` to `out` and returns its listing.
///
/// Fails rather than produce a wrong archive when a file changes size while it is read, or
/// when the tree holds something a NAR cannot represent (a socket, a device).
pub fn dump<W: Write>(path: &Path, out: &mut W) -> io::Result<Listing> {
    let mut w = Counting {
        inner: out,
        written: 0,
        contents: true,
    };
    w.str(MAGIC.as_bytes())?;
    let root = node(path, &mut w)?;
    Ok(Listing { root })
}

/// The listing of the NAR `path` would give, from metadata alone: no file contents are read,
/// so listing a store object costs a directory walk, not a full read.
pub fn listing(path: &Path) -> io::Result<Listing> {
    let mut sink = io::sink();
    let mut w = Counting {
        inner: &mut sink,
        written: 0,
        contents: false,
    };
    w.str(MAGIC.as_bytes())?;
    let root = node(path, &mut w)?;
    Ok(Listing { root })
}

fn node<W: Write>(path: &Path, w: &mut Counting<'_, W>) -> io::Result<Node> {
    let meta = fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    w.str(b"(")?;
    w.str(b"type")?;
    let node = if ft.is_symlink() {
        let target = fs::read_link(path)?.into_os_string().into_vec_bytes();
        w.str(b"symlink")?;
        w.str(b"target")?;
        w.str(&target)?;
        Node::Symlink { target }
    } else if ft.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        w.str(b"regular")?;
        if executable {
            w.str(b"executable")?;
            w.str(b"")?;
        }
        w.str(b"contents")?;
        let size = meta.len();
        w.u64(size)?;
        let nar_offset = w.written;
        let copied = if w.contents {
            let mut f = File::open(path)?;
            io::copy(&mut (&mut f).take(size), &mut w.inner)?
        } else {
            size
        };
        w.written += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was being archived", path.display()),
            ));
        }
        w.pad(size)?;
        Node::Regular {
            size,
            executable,
            nar_offset,
        }
    } else if ft.is_dir() {
        w.str(b"directory")?;
        let mut names: Vec<Vec<u8>> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<io::Result<_>>()?;
        names.sort();
        let mut entries = BTreeMap::new();
        for name in names {
            w.str(b"entry")?;
            w.str(b"(")?;
            w.str(b"name")?;
            w.str(&name)?;
            w.str(b"node")?;
            let child = node(&path.join(std::ffi::OsStr::from_bytes(&name)), w)?;
            w.str(b")")?;
            entries.insert(name, child);
        }
        Node::Directory { entries }
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is neither a file, a directory nor a symlink; a NAR cannot hold it",
                path.display()
            ),
        ));
    };
    w.str(b")")?;
    Ok(node)
}

trait IntoVecBytes {
    fn into_vec_bytes(self) -> Vec<u8>;
}

impl IntoVecBytes for std::ffi::OsString {
    fn into_vec_bytes(self) -> Vec<u8> {
        use std::os::unix::ffi::OsStringExt;
        self.into_vec()
    }
}
