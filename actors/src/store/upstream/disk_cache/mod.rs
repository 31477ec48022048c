//! NARs fetched from upstreams, kept in a folder with a size bound.
//!
//! The index is a moka cache weighed by file size; its eviction listener deletes the file, so
//! the folder never grows past the bound for long. On a miss exactly one upstream fetch runs
//! (single flight): it writes a temporary file, and every client asking for that NAR
//! meanwhile (the first included) reads the growing file as bytes arrive, told how far the
//! writer got through a watch channel. The file is renamed into place only when it is complete
//! and matches the narinfo's `FileSize`/`FileHash`; on a mismatch it is discarded and the
//! readers' streams end in an error, so no client keeps a NAR that was not verified whole.
//!
//! Range requests are answered from the file too: while it is still being fetched they wait
//! for the bytes they want to arrive, which keeps the upstream at one fetch per NAR.
//!
//! The fetch runs in its own task, so a client that hangs up does not cancel it for the
//! others (nor waste what was already downloaded).

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use moka::future::Cache;
use moka::notification::RemovalCause;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use crate::formats::hash::HashingCounter;
use crate::formats::{Algo, Hash};
use crate::store::{Blob, ByteRange, ByteStream, Result, StoreError};

/// Characters of a NAR URL kept as they are in file names; `/` and everything else is escaped,
/// so one flat folder holds every URL and the name decodes back to the URL at start-up.
const NAME: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_');

/// Prefix of files still being written; they are removed at start-up.
const PART: &str = ".part-";

/// Bytes read from a kept or growing NAR file per piece handed to a client: what a client
/// that stops reading holds (600 stalled clients of 256 KiB pieces grew peak RSS by 460 MiB).
const READ_PIECE: usize = 128 * 1024;

/// What the narinfo promises about a NAR file, checked before it is kept.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// `FileSize:`.
    pub size: Option<u64>,
    /// `FileHash:`.
    pub hash: Option<Hash>,
}

impl Expected {
    /// Refuses a download of `key` whose announced length is not the narinfo's `FileSize`.
    pub fn check_announced(&self, announced: Option<u64>, key: &str) -> Result<()> {
        match (announced, self.size) {
            (Some(l), Some(s)) if l != s => Err(StoreError::Corrupt(format!(
                "the upstream sends {l} bytes for {key}, its narinfo says FileSize {s}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The start of an upstream download: the body, and its length when the upstream said it.
pub type Download = (ByteStream, Option<u64>);

/// Starts the download of a NAR from the upstreams.
pub type StartDownload = Pin<Box<dyn Future<Output = Result<Download>> + Send>>;

#[derive(Debug)]
struct CachedNar {
    path: PathBuf,
    size: u64,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    /// The part file exists (readers may open it).
    started: bool,
    /// The whole size, when known before the end.
    total: Option<u64>,
    /// Bytes in the part file so far.
    written: u64,
    /// `None` while running; `Some(Ok)` once kept, `Some(Err)` when it failed.
    outcome: Option<std::result::Result<(), Arc<str>>>,
}

/// A size-bounded folder of NARs with single-flight fetching.
pub struct NarDiskCache {
    dir: PathBuf,
    index: Cache<String, Arc<CachedNar>>,
    /// Downloads in progress: how far each got, and its part file.
    inflight: Mutex<HashMap<String, (watch::Receiver<Progress>, PathBuf)>>,
    loaded: tokio::sync::OnceCell<()>,
    part_counter: AtomicU64,
    fetches: AtomicU64,
    /// The size bound: also the most one download may write when nothing else bounds it.
    max_bytes: u64,
    /// Downloads running at once. Downloads are detached tasks (they go on when their
    /// clients leave, so the file can be kept), so only this bounds how many connections and
    /// part files clients asking for many different NARs can make the daemon open.
    downloads: Semaphore,
}

/// Upstream downloads that run at once per NAR cache; more wait their turn (their clients
/// wait too, within the serve's `--backend-timeout`).
pub const MAX_DOWNLOADS: usize = 16;

impl std::fmt::Debug for NarDiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NarDiskCache({})", self.dir.display())
    }
}

fn io_err(what: impl Into<String>, e: io::Error) -> StoreError {
    StoreError::backend(what, e)
}

impl NarDiskCache {
    /// A cache in `dir` (created) holding at most `max_bytes` of NAR files. Files already in
    /// the folder are indexed on first use.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<NarDiskCache>> {
        Self::open_with_downloads(dir, max_bytes, MAX_DOWNLOADS)
    }

    /// Like [`NarDiskCache::open`], with at most `downloads` downloads at once.
    pub fn open_with_downloads(
        dir: &Path,
        max_bytes: u64,
        downloads: usize,
    ) -> Result<Arc<NarDiskCache>> {
        std::fs::create_dir_all(dir).map_err(|e| {
            io_err(
                format!(
                    "creating the NAR cache folder {} (give a writable --nar-cache-dir)",
                    dir.display()
                ),
                e,
            )
        })?;
        let index = Cache::builder()
            // Weights are KiB so that files of up to 4 TiB fit moka's u32 weights.
            .max_capacity((max_bytes / 1024).max(1))
            .weigher(|_k: &String, v: &Arc<CachedNar>| {
                v.size.div_ceil(1024).try_into().unwrap_or(u32::MAX)
            })
            .eviction_listener(|_k, v: Arc<CachedNar>, cause| {
                // A replaced entry names the same file as its successor: keep it.
                if cause != RemovalCause::Replaced {
                    if let Err(e) = std::fs::remove_file(&v.path) {
                        if e.kind() != io::ErrorKind::NotFound {
                            tracing::warn!("removing evicted NAR {}: {e}", v.path.display());
                        }
                    }
                }
            })
            .build();
        Ok(Arc::new(NarDiskCache {
            dir: dir.to_owned(),
            index,
            inflight: Mutex::new(HashMap::new()),
            loaded: tokio::sync::OnceCell::new(),
            part_counter: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            max_bytes,
            downloads: Semaphore::new(downloads.max(1)),
        }))
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many upstream downloads this cache started (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(utf8_percent_encode(key, NAME).to_string())
    }

    /// Indexes the files a previous run left, and removes its unfinished part files.
    async fn load(&self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("reading the NAR cache folder {}: {e}", self.dir.display());
                return;
            }
        };
        let mut n = 0u64;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(PART) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let Ok(key) = percent_decode_str(&name).decode_utf8() else {
                continue;
            };
            if !meta.is_file() || self.path_of(&key) != path {
                continue;
            }
            n += 1;
            self.index
                .insert(
                    key.into_owned(),
                    Arc::new(CachedNar {
                        path,
                        size: meta.len(),
                    }),
                )
                .await;
        }
        if n > 0 {
            tracing::info!(
                "NAR cache {}: {n} files from earlier runs",
                self.dir.display()
            );
        }
    }

    /// True when the NAR is kept here.
    pub async fn contains(&self, key: &str) -> bool {
        self.loaded.get_or_init(|| self.load()).await;
        self.index.contains_key(key)
    }

    /// Serves `key` (or a range of it) from the folder, downloading it once with `start` when
    /// it is not there yet; concurrent callers share that download.
    pub async fn get(
        self: &Arc<Self>,
        key: &str,
        range: Option<ByteRange>,
        expected: Expected,
        start: impl FnOnce() -> StartDownload,
    ) -> Result<Blob> {
        self.loaded.get_or_init(|| self.load()).await;
        if let Some(hit) = self.index.get(key).await {
            match open_file(&hit.path).await {
                Ok(file) => return file_blob(file, hit.size, range).await,
                // Evicted between the lookup and the open: fetch it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.index.invalidate(key).await;
                }
                Err(e) => return Err(io_err(format!("opening {}", hit.path.display()), e)),
            }
        }
        let (rx, part) = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(key) {
                Some(flight) => flight.clone(),
                None => {
                    let (tx, rx) = watch::channel(Progress::default());
                    self.fetches.fetch_add(1, Ordering::Relaxed);
                    let n = self.part_counter.fetch_add(1, Ordering::Relaxed);
                    let part = self.dir.join(format!("{PART}{}-{n}", std::process::id()));
                    inflight.insert(key.to_owned(), (rx.clone(), part.clone()));
                    tokio::spawn(self.clone().download(
                        key.to_owned(),
                        part.clone(),
                        expected,
                        start(),
                        tx,
                    ));
                    (rx, part)
                }
            }
        };
        self.follow(key, rx, &part, range).await
    }

    /// The single download of `key`: to a part file, verified, then renamed into place.
    async fn download(
        self: Arc<Self>,
        key: String,
        part: PathBuf,
        expected: Expected,
        start: StartDownload,
        tx: watch::Sender<Progress>,
    ) {
        let dest = self.path_of(&key);
        let r = async {
            // Held until the download ends, kept or not.
            let _slot = self
                .downloads
                .acquire()
                .await
                .expect("the download semaphore is never closed");
            let (mut body, len) = start.await?;
            expected.check_announced(len, &key)?;
            let mut file = tokio::fs::File::create(&part)
                .await
                .map_err(|e| io_err(format!("creating {}", part.display()), e))?;
            tx.send_modify(|p| {
                p.started = true;
                p.total = len.or(expected.size);
            });
            // An upstream that sends more than it announced (or more than the folder holds)
            // is cut off before it fills the disk.
            let cap = expected.size.or(len).unwrap_or(self.max_bytes);
            let mut hasher = HashingCounter::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| io_err(format!("downloading {key}"), e))?;
                if hasher.len().saturating_add(chunk.len() as u64) > cap {
                    return Err(StoreError::Corrupt(format!(
                        "upstream sends more than {cap} bytes for {key}; expected no more"
                    )));
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| io_err(format!("writing {}", part.display()), e))?;
                // tokio's File completes writes in the background; readers of the part file
                // must only be told about bytes the kernel has.
                file.flush()
                    .await
                    .map_err(|e| io_err(format!("writing {}", part.display()), e))?;
                hasher.update(&chunk);
                tx.send_modify(|p| p.written += chunk.len() as u64);
            }
            drop(file);
            let (sha, size) = hasher.finish();
            if let Some(s) = expected.size.or(len) {
                if s != size {
                    return Err(StoreError::Corrupt(format!(
                        "upstream sent {size} bytes for {key}, expected {s}"
                    )));
                }
            }
            // Only bytes checked against a hash are kept; callers proxy what has none.
            match expected.hash.as_ref().filter(|h| h.algo() == Algo::Sha256) {
                Some(h) if *h == sha => {}
                Some(h) => {
                    return Err(StoreError::Corrupt(format!(
                        "{key} from upstream has sha256 {}, its narinfo says FileHash {}",
                        sha.to_nix32(),
                        h.to_nix32()
                    )))
                }
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "{key} from upstream has no SHA-256 FileHash to check; not keeping it"
                    )))
                }
            }
            tokio::fs::rename(&part, &dest)
                .await
                .map_err(|e| io_err(format!("moving {} into place", dest.display()), e))?;
            self.index
                .insert(
                    key.clone(),
                    Arc::new(CachedNar {
                        path: dest.clone(),
                        size,
                    }),
                )
                .await;
            Ok(size)
        }
        .await;
        match r {
            Ok(size) => {
                tracing::debug!("kept {key} ({size} bytes) in the NAR cache");
                tx.send_modify(|p| {
                    p.total = Some(size);
                    p.outcome = Some(Ok(()));
                });
            }
            Err(e) => {
                tracing::warn!("fetching {key} from upstream: {e}");
                let _ = tokio::fs::remove_file(&part).await;
                let msg: Arc<str> = e.to_string().into();
                tx.send_modify(|p| p.outcome = Some(Err(msg)));
            }
        }
        self.inflight.lock().expect("inflight lock").remove(&key);
    }

    /// A reader of a download in progress (or just finished).
    async fn follow(
        &self,
        key: &str,
        mut rx: watch::Receiver<Progress>,
        part: &Path,
        range: Option<ByteRange>,
    ) -> Result<Blob> {
        let failed = |m: &str| StoreError::backend(format!("fetching {key} from upstream"), m);
        let p = rx
            .wait_for(|p| p.outcome.is_some() || (p.started && p.total.is_some()))
            .await
            .map_err(|_| failed("the download stopped"))?
            .clone();
        match &p.outcome {
            Some(Err(m)) => return Err(failed(m)),
            Some(Ok(())) => {
                let path = self.path_of(key);
                let file = open_file(&path)
                    .await
                    .map_err(|e| io_err(format!("opening {}", path.display()), e))?;
                let size = p.total.unwrap_or(p.written);
                return file_blob(file, size, range).await;
            }
            None => {}
        }
        let total = p.total.expect("waited for it");
        let (start, end) = ByteRange::resolve_or_err(range, total)?;
        // The part file, or (if it was renamed meanwhile) the kept one: the same bytes.
        let mut file = match open_file(part).await {
            Ok(f) => f,
            Err(_) => open_file(&self.path_of(key))
                .await
                .map_err(|e| io_err(format!("opening the download of {key}"), e))?,
        };
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| io_err(format!("reading {key}"), e))?;
        let key = key.to_owned();
        let stream = futures::stream::try_unfold(
            (file, start, rx, key),
            move |(mut file, pos, mut rx, key)| async move {
                if pos >= end {
                    if end == total {
                        // The whole rest was read: end cleanly only once it was verified.
                        let p = rx
                            .wait_for(|p| p.outcome.is_some())
                            .await
                            .map_err(|_| io::Error::other("the download stopped"))?
                            .clone();
                        if let Some(Err(m)) = p.outcome {
                            return Err(io::Error::other(format!("{key}: {m}")));
                        }
                    }
                    return Ok(None);
                }
                loop {
                    let p = rx.borrow_and_update().clone();
                    if p.written > pos {
                        let want = (p.written.min(end) - pos).min(READ_PIECE as u64) as usize;
                        let mut buf = vec![0u8; want];
                        file.read_exact(&mut buf).await?;
                        let next = pos + want as u64;
                        return Ok(Some((Bytes::from(buf), (file, next, rx, key))));
                    }
                    match p.outcome {
                        Some(Err(m)) => return Err(io::Error::other(format!("{key}: {m}"))),
                        Some(Ok(())) => {
                            return Err(io::Error::other(format!("{key} ended short")));
                        }
                        None => {
                            if rx.changed().await.is_err() && rx.borrow().outcome.is_none() {
                                return Err(io::Error::other("the download stopped"));
                            }
                        }
                    }
                }
            },
        );
        Ok(Blob {
            stream: Box::pin(stream),
            span: (start, end),
            encoding: None,
            total,
        })
    }
}

async fn open_file(path: &Path) -> io::Result<tokio::fs::File> {
    tokio::fs::File::open(path).await
}

/// A complete file (or a range of it) as a blob.
async fn file_blob(mut file: tokio::fs::File, size: u64, range: Option<ByteRange>) -> Result<Blob> {
    let (start, end) = ByteRange::resolve_or_err(range, size)?;
    file.seek(SeekFrom::Start(start))
        .await
        .map_err(|e| io_err("reading a cached NAR", e))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(end - start), READ_PIECE);
    Ok(Blob {
        stream: Box::pin(stream),
        span: (start, end),
        encoding: None,
        total: size,
    })
}

#[cfg(test)]
mod tests;
