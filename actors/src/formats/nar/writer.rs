//! Serialising a file-system tree as a NAR, byte-identical to `nix-store --dump`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::sync::mpsc;

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

/// Chunk size handed from the archiving thread to the async side.
const CHUNK: usize = 256 * 1024;

/// Chunks in flight between the archiving thread and the consumer; with [`CHUNK`] this bounds
/// the memory one NAR stream can hold, whatever the NAR's size.
const CHANNEL_DEPTH: usize = 4;

struct ChannelWriter {
    buf: BytesMut,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "NAR consumer went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A NAR produced on a blocking thread and consumed as an async byte stream.
///
/// Dropping the stream stops the archiving thread at its next chunk.
pub struct NarStream {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl Stream for NarStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Streams the NAR of `path` in bounded memory; an error while archiving ends the stream
/// with that error, so a consumer never mistakes a truncated NAR for a whole one.
pub fn dump_stream(path: PathBuf) -> NarStream {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            buf: BytesMut::with_capacity(CHUNK),
            tx: tx.clone(),
        };
        let result = dump(&path, &mut w).and_then(|_| w.flush());
        if let Err(e) = result {
            if e.kind() != io::ErrorKind::BrokenPipe {
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    NarStream { rx }
}
