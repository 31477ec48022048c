//! `file://DIR`: a binary cache in a local folder, in the layout `nix copy --to file://` writes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::blobs::{check_key, Blobs, ObjectMeta};
use super::{Blob, ByteRange, ByteStream, Result, StoreError};

/// Prefix of temporary files; they are hidden from listings and never served.
const TMP_PREFIX: &str = ".nixcached-tmp-";

/// Objects as files below a root folder.
#[derive(Debug, Clone)]
pub struct FileBlobs {
    root: PathBuf,
}

impl FileBlobs {
    /// Opens a folder; with `create`, makes it (and parents) when missing.
    pub fn open(root: impl Into<PathBuf>, create: bool) -> Result<FileBlobs> {
        let root: PathBuf = root.into();
        if create {
            std::fs::create_dir_all(&root).map_err(|e| {
                StoreError::backend(format!("creating cache folder {}", root.display()), e)
            })?;
        }
        let root = root.canonicalize().map_err(|e| {
            StoreError::backend(
                format!(
                    "opening cache folder {} (create it, or check the file:// URL)",
                    root.display()
                ),
                e,
            )
        })?;
        if !root.is_dir() {
            return Err(StoreError::Invalid(format!(
                "{} is not a folder",
                root.display()
            )));
        }
        Ok(FileBlobs { root })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps a key to a path, refusing any that would resolve outside the root (through `..`
    /// or through a symlink planted inside the cache).
    fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        if key
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with(TMP_PREFIX))
        {
            return Err(StoreError::NotFound(key.into()));
        }
        let path = self.root.join(key);
        // Resolve the deepest part that exists: a symlink anywhere along the way (to a file
        // or to a folder a write would go into) must still land inside the root.
        let mut probe = path.as_path();
        let real = loop {
            match probe.canonicalize() {
                Ok(real) => break real,
                Err(_) => match probe.parent() {
                    Some(parent) => probe = parent,
                    None => break self.root.clone(),
                },
            }
        };
        if !real.starts_with(&self.root) {
            return Err(StoreError::Invalid(format!(
                "object key {key:?} resolves outside the cache folder"
            )));
        }
        Ok(path)
    }
}

/// Bytes read per call: big enough that a hand-off to a blocking thread is rare, small enough
/// that a client that stops reading holds little (the HTTP layer keeps about one chunk per
/// response, in a buffer that grows by doubling: 600 stalled readers measured ~0.5
/// MiB each at 256 KiB, ~1.2 MiB at 1 MiB).
const READ_CHUNK: u64 = 128 << 10;

impl FileBlobs {
    /// Opens `key` and reads the first chunk of `range`; blocking.
    fn open_span(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        let path = self.path_of(key)?;
        // Non-blocking, so that a FIFO planted in the folder cannot hold the thread forever
        // (regular files ignore the flag; anything else is refused below).
        let f = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| io_err("reading", key, e))?;
        let meta = f.metadata().map_err(|e| io_err("reading", key, e))?;
        if !meta.is_file() {
            return Err(StoreError::NotFound(key.into()));
        }
        let total = meta.len();
        let (start, end) = ByteRange::resolve_or_err(range, total)?;
        let first = read_chunk_at(&f, start, end - start).map_err(|e| io_err("reading", key, e))?;
        Ok(span_blob(f, first, start, end, total))
    }

    /// [`FileBlobs::open_span`] without waiting for the disk, for the async thread: `None` when
    /// any step would have to wait (or fails: the blocking path then reports why).
    fn open_span_cached(&self, key: &str, range: Option<ByteRange>) -> Option<Result<Blob>> {
        let path = self.path_of(key).ok()?;
        let f = open_cached(&path)?;
        let meta = f.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        let total = meta.len();
        let (start, end) = match ByteRange::resolve_or_err(range, total) {
            Ok(span) => span,
            Err(e) => return Some(Err(e)),
        };
        let first = if start == end {
            Bytes::new()
        } else {
            match read_cached(&f, start, (end - start).min(READ_CHUNK) as usize) {
                Ok(Cached::Read(c)) => c,
                _ => return None,
            }
        };
        Some(Ok(span_blob(f, first, start, end, total)))
    }
}

/// Opens `path` read-only only if every component of it is in the kernel's lookup caches
/// (`openat2` with `RESOLVE_CACHED`), so it never waits for the disk; `None` otherwise, and on
/// kernels without `openat2` (before 5.6) or `RESOLVE_CACHED` (before 5.12).
fn open_cached(path: &Path) -> Option<File> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    /// The kernel's `struct open_how` (libc's is non-exhaustive, so it cannot be built).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
        mode: 0,
        resolve: libc::RESOLVE_CACHED,
    };
    // SAFETY: `path` is NUL-terminated and `how` is an `open_how` of the size passed; the
    // kernel only reads both.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// The blob of bytes `start..end` of the open file `f`, whose first chunk is `first`.
fn span_blob(f: File, first: Bytes, start: u64, end: u64, total: u64) -> Blob {
    let pos = start + first.len() as u64;
    let head = futures::stream::once(async move { Ok(first) });
    let stream: ByteStream = if pos == end {
        Box::pin(head)
    } else {
        Box::pin(head.chain(chunks(f, pos, end - pos)))
    };
    Blob {
        stream,
        span: (start, end),
        encoding: None,
        total,
    }
}

/// Why a read came up short: the file is no longer as long as it was when it was opened.
fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the cache file shrank while it was being served",
    )
}

/// Reads up to [`READ_CHUNK`] of the `left` bytes still wanted, from offset `pos`; blocking.
/// An early end of file is an error rather than a short response.
fn read_chunk_at(f: &File, pos: u64, left: u64) -> io::Result<Bytes> {
    let mut buf = vec![0; left.min(READ_CHUNK) as usize];
    f.read_exact_at(&mut buf, pos).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => shrank(),
        _ => e,
    })?;
    Ok(Bytes::from(buf))
}

/// What [`read_cached`] found.
enum Cached {
    /// Bytes that were in the page cache (at least one, at most the chunk asked for).
    Read(Bytes),
    /// The next bytes are not in memory: reading them would wait for the disk.
    NotInMemory,
    /// This kernel or file system cannot read without waiting (no `RWF_NOWAIT`).
    Unsupported,
}

/// Reads up to `want` bytes at `pos` only if they are in the page cache, without ever waiting
/// for the disk (`preadv2` with `RWF_NOWAIT`), so it may run on an async worker thread.
fn read_cached(f: &File, pos: u64, want: usize) -> io::Result<Cached> {
    let Ok(offset) = libc::off_t::try_from(pos) else {
        return Ok(Cached::Unsupported);
    };
    let mut buf = Vec::<u8>::with_capacity(want);
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: want,
    };
    // SAFETY: `iov` describes `want` bytes of `buf`'s spare capacity, which outlives the call;
    // the kernel writes at most that many bytes there.
    let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Cached::NotInMemory),
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(Cached::Unsupported),
            _ => Err(e),
        };
    }
    if n == 0 {
        return Err(shrank());
    }
    // SAFETY: the kernel initialised the first `n` (<= `want`) bytes.
    unsafe { buf.set_len(n as usize) };
    Ok(Cached::Read(Bytes::from(buf)))
}

/// The remaining `left` bytes of `f` from offset `pos`, one chunk per poll, read when the
/// client asks for more (a stalled client holds nothing read ahead).
///
/// Bytes in the page cache, which is where a busy cache's NARs are, are read right on the
/// async thread with [`read_cached`]: a hand-off to a blocking thread per chunk was most of the
/// context switches of sending a large NAR. Bytes that would wait for the disk, and every
/// read where the kernel cannot tell, are read on a blocking thread.
fn chunks(f: File, pos: u64, left: u64) -> impl futures::Stream<Item = io::Result<Bytes>> {
    futures::stream::try_unfold(
        (Arc::new(f), pos, left, true),
        |(f, pos, left, mut nowait)| async move {
            if left == 0 {
                return Ok(None);
            }
            let want = left.min(READ_CHUNK);
            let mut chunk = None;
            if nowait {
                match read_cached(&f, pos, want as usize)? {
                    Cached::Read(c) => chunk = Some(c),
                    Cached::NotInMemory => {}
                    Cached::Unsupported => nowait = false,
                }
            }
            let chunk = match chunk {
                Some(c) => c,
                None => {
                    let file = f.clone();
                    tokio::task::spawn_blocking(move || read_chunk_at(&file, pos, want))
                        .await
                        .map_err(io::Error::other)??
                }
            };
            let n = chunk.len() as u64;
            Ok(Some((chunk, (f, pos + n, left - n, nowait))))
        },
    )
}

fn io_err(what: &str, key: &str, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound(key.into())
    } else {
        StoreError::backend(format!("{what} {key}"), e)
    }
}

#[async_trait]
impl Blobs for FileBlobs {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        // Resolving, opening, sizing and the first read happen in one blocking call: a small
        // NAR is then served with a single thread hand-off instead of one per step.
        // A file whose path, inode and first bytes are all in memory is opened and started
        // right here, with no hand-off at all.
        if let Some(blob) = self.open_span_cached(key, range) {
            return blob;
        }
        let this = self.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || this.open_span(&key, range))
            .await
            .map_err(|e| StoreError::backend("reading a cache file", e))?
    }

    async fn put(&self, key: &str, mut data: ByteStream, _content_type: &str) -> Result<u64> {
        let path = self.path_of(key)?;
        let dir = path
            .parent()
            .expect("keys are below the root")
            .to_path_buf();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| StoreError::backend(format!("creating {}", dir.display()), e))?;
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&dir)
            .map_err(|e| {
                StoreError::backend(format!("creating a temporary file in {}", dir.display()), e)
            })?;
        let (std_file, tmp_path) = tmp.into_parts();
        let mut f = tokio::fs::File::from_std(std_file);
        let mut n = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk =
                chunk.map_err(|e| StoreError::backend(format!("receiving data for {key}"), e))?;
            f.write_all(&chunk)
                .await
                .map_err(|e| io_err("writing", key, e))?;
            n += chunk.len() as u64;
        }
        f.sync_all().await.map_err(|e| io_err("writing", key, e))?;
        drop(f);
        // Cache files are world-readable like the ones Nix writes (tempfile makes them 0600).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp_path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io_err("writing", key, e))?;
        tmp_path
            .persist(&path)
            .map_err(|e| StoreError::backend(format!("renaming into place {key}"), e.error))?;
        Ok(n)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", key, e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("checking", key, e)),
        }
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path_of(prefix.trim_end_matches('/'))?
        };
        // One blocking task for the whole folder: a hop per entry costs more than the
        // `stat` itself, and caches hold a million files.
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_err("listing", &prefix, e)),
            };
            let mut keys = Vec::new();
            for e in rd {
                let e = e.map_err(|e| io_err("listing", &prefix, e))?;
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with(TMP_PREFIX) {
                    continue;
                }
                // A file removed between the listing and this look is simply not listed.
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                keys.push(ObjectMeta {
                    key: format!("{prefix}{name}"),
                    size: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
            Ok(keys)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("listing {}: {e}", self.root.display())))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MiB and a bit of bytes no two chunks of which are alike.
    fn contents() -> Vec<u8> {
        (0..(1u32 << 20) + 4097)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    async fn read_all(
        blobs: &FileBlobs,
        key: &str,
        range: Option<ByteRange>,
    ) -> io::Result<Vec<u8>> {
        let blob = blobs.get(key, range).await.map_err(io::Error::other)?;
        let mut out = Vec::new();
        let mut s = blob.stream;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    /// Drops the file's pages from the page cache (they are clean after the sync), so the next
    /// reads must wait for the disk.
    fn evict(path: &Path) {
        let f = File::open(path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a plain advisory call on an open descriptor.
        assert_eq!(
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
            0
        );
    }

    /// Whole files and ranges come back byte for byte, from the page cache and from the disk.
    #[tokio::test]
    async fn hot_and_cold_files_and_ranges_read_back_exactly() {
        let d = tempfile::tempdir().unwrap();
        let blobs = FileBlobs::open(d.path(), false).unwrap();
        let want = contents();
        let path = d.path().join("nar/x.nar");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &want).unwrap();
        for cold in [false, true] {
            if cold {
                evict(&path);
            }
            // Hot, the file is opened and started without a blocking call; cold, it is not.
            assert_eq!(
                blobs.open_span_cached("nar/x.nar", None).is_some(),
                !cold,
                "cold {cold}"
            );
            assert_eq!(read_all(&blobs, "nar/x.nar", None).await.unwrap(), want);
            for (start, end) in [
                (0, 1),
                (5, 200_000),
                (131_071, 131_073),
                (900_000, want.len()),
            ] {
                let got = read_all(
                    &blobs,
                    "nar/x.nar",
                    Some(ByteRange::Span {
                        start: start as u64,
                        end: Some(end as u64),
                    }),
                )
                .await
                .unwrap();
                assert_eq!(got, want[start..end], "range {start}..{end}, cold {cold}");
            }
        }
    }

    /// The non-waiting read answers bytes that are in memory and declines (on file systems that
    /// can tell, as ext4 here) bytes that are not.
    #[test]
    fn cached_reads_never_wait_for_the_disk() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        let want = contents();
        std::fs::write(&path, &want).unwrap();
        let f = File::open(&path).unwrap();
        match read_cached(&f, 4096, 100_000).unwrap() {
            Cached::Read(b) => assert_eq!(b[..], want[4096..4096 + b.len()]),
            Cached::NotInMemory => panic!("a file just written is in memory"),
            Cached::Unsupported => panic!("this kernel and file system support RWF_NOWAIT"),
        }
        evict(&path);
        assert!(matches!(
            read_cached(&f, 600_000, 100_000).unwrap(),
            Cached::NotInMemory
        ));
    }

    /// A file cut short while it is being sent fails the response instead of ending it early,
    /// whichever way the missing bytes were to be read.
    #[tokio::test]
    async fn a_file_that_shrinks_mid_response_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let blobs = FileBlobs::open(d.path(), false).unwrap();
        let path = d.path().join("x.nar");
        for cold in [false, true] {
            std::fs::write(&path, contents()).unwrap();
            let blob = blobs.get("x.nar", None).await.unwrap();
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(300_000)
                .unwrap();
            if cold {
                evict(&path);
            }
            let mut s = blob.stream;
            let mut got = 0;
            let err = loop {
                match s.next().await {
                    Some(Ok(c)) => got += c.len(),
                    Some(Err(e)) => break e,
                    None => panic!("the stream ended after {got} bytes without an error"),
                }
            };
            // What was sent is a prefix of what the file still holds.
            assert!(
                (READ_CHUNK as usize..=300_000).contains(&got),
                "{got}, cold {cold}"
            );
            assert!(err.to_string().contains("shrank"), "{err}");
        }
    }

    /// Missing files, folders and FIFOs planted in the folder are "not found", at once (an
    /// open of a FIFO without a writer would otherwise wait for one forever).
    #[tokio::test]
    async fn only_regular_files_are_served() {
        let d = tempfile::tempdir().unwrap();
        let blobs = FileBlobs::open(d.path(), false).unwrap();
        std::fs::create_dir_all(d.path().join("nar/dir.nar")).unwrap();
        let fifo =
            std::ffi::CString::new(d.path().join("nar/fifo.nar").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        for key in ["nar/missing.nar", "nar/dir.nar", "nar/fifo.nar"] {
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), blobs.get(key, None))
                .await
                .unwrap_or_else(|_| panic!("{key}: no answer in 5 s"));
            assert!(matches!(got, Err(StoreError::NotFound(_))), "{key}");
        }
    }
}
