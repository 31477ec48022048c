//! `file://DIR`: a binary cache in a local folder, in the layout `nix copy --to file://` writes.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::blobs::{check_key, Blobs};
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

/// Bytes read per blocking call: big enough that the hand-off to a blocking thread is rare,
/// small enough that a client that stops reading holds little (the HTTP layer keeps about one
/// chunk per response, in a buffer that grows by doubling: 600 stalled readers measured ~0.5
/// MiB each at 256 KiB, ~1.2 MiB at 1 MiB).
const READ_CHUNK: u64 = 128 << 10;

impl FileBlobs {
    /// Opens `key` and reads the first chunk of `range`; blocking.
    fn open_span(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        let path = self.path_of(key)?;
        let mut f = std::fs::File::open(&path).map_err(|e| io_err("reading", key, e))?;
        let meta = f.metadata().map_err(|e| io_err("reading", key, e))?;
        if !meta.is_file() {
            return Err(StoreError::NotFound(key.into()));
        }
        let total = meta.len();
        let (start, end) = ByteRange::resolve_or_err(range, total)?;
        if start > 0 {
            f.seek(SeekFrom::Start(start))
                .map_err(|e| io_err("reading", key, e))?;
        }
        let first = read_chunk(&mut f, end - start).map_err(|e| io_err("reading", key, e))?;
        let rest = end - start - first.len() as u64;
        let head = futures::stream::once(async move { Ok(first) });
        let stream: ByteStream = if rest == 0 {
            Box::pin(head)
        } else {
            Box::pin(head.chain(chunks(f, rest)))
        };
        Ok(Blob {
            stream,
            span: (start, end),
            total,
        })
    }
}

/// Reads up to [`READ_CHUNK`] of the `left` bytes still wanted; an early end of file (the
/// file shrank under us) is an error rather than a short response.
fn read_chunk(f: &mut std::fs::File, left: u64) -> std::io::Result<Bytes> {
    let want = left.min(READ_CHUNK);
    let mut buf = Vec::with_capacity(want as usize);
    f.take(want).read_to_end(&mut buf)?;
    if (buf.len() as u64) < want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the cache file shrank while it was being served",
        ));
    }
    Ok(Bytes::from(buf))
}

/// The remaining `left` bytes of `f`, a chunk per blocking call, the next chunk read while
/// the last one is sent (so a stalled client holds at most one chunk read ahead).
fn chunks(f: std::fs::File, left: u64) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    type Read = tokio::task::JoinHandle<std::io::Result<(std::fs::File, Bytes)>>;
    fn read_next(mut f: std::fs::File, left: u64) -> Read {
        tokio::task::spawn_blocking(move || read_chunk(&mut f, left).map(|c| (f, c)))
    }
    futures::stream::try_unfold(
        (Some(read_next(f, left)), left),
        |(next, left)| async move {
            let Some(reading) = next else {
                return Ok(None);
            };
            let (f, chunk) = reading.await.map_err(std::io::Error::other)??;
            let left = left - chunk.len() as u64;
            let next = (left > 0).then(|| read_next(f, left));
            Ok(Some((chunk, (next, left))))
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

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("checking", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path_of(prefix.trim_end_matches('/'))?
        };
        let mut rd = match tokio::fs::read_dir(&dir).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", prefix, e)),
        };
        let mut keys = Vec::new();
        while let Some(e) = rd
            .next_entry()
            .await
            .map_err(|e| io_err("listing", prefix, e))?
        {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) || !e.file_type().await.is_ok_and(|t| t.is_file()) {
                continue;
            }
            keys.push(format!("{prefix}{name}"));
        }
        Ok(keys)
    }
}
