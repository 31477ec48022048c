//! NARs handed to an ssh store with `put_nar`, kept in temporary files on local disk until
//! `put_narinfo` imports them.
//!
//! A Nix store takes a path's NAR and its metadata in one request, while a binary-cache
//! writer gives the NAR first and the narinfo after. The NAR waits here, on disk rather than
//! in memory (NARs can be gigabytes). Files are named by URL; a binary-cache URL names the
//! NAR's content (`nar/<narhash>.nar…`), so two uploads of the same URL at once carry the same
//! bytes and share the entry, which lives until each has been claimed.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;

use crate::store::ByteStream;

/// NARs never claimed (an upload that failed between NAR and narinfo) are deleted after this.
const MAX_AGE: Duration = Duration::from_secs(3600);

struct Entry {
    file: Arc<TempPath>,
    /// `put`s not yet matched by a `claim`.
    pending: usize,
    at: Instant,
}

/// Spooled NARs by URL.
#[derive(Default)]
pub struct Spool {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Spool {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `data` to a new temporary file (in `TMPDIR`) kept under `url`; returns its size.
    /// A stream that fails leaves nothing behind.
    pub async fn put(&self, url: &str, mut data: ByteStream) -> io::Result<u64> {
        let tmp = tokio::task::spawn_blocking(|| {
            tempfile::Builder::new()
                .prefix("nixcached-ssh-nar-")
                .tempfile()
        })
        .await
        .map_err(io::Error::other)??;
        let (file, path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let mut size = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            file.write_all(&chunk).await?;
            size += chunk.len() as u64;
        }
        file.flush().await?;
        drop(file);
        let mut entries = self.entries();
        entries.retain(|_, e| e.at.elapsed() < MAX_AGE);
        let file = Arc::new(path);
        match entries.get_mut(url) {
            Some(e) => {
                // Anyone who claimed the previous file keeps it alive through their Arc.
                e.file = file;
                e.pending += 1;
                e.at = Instant::now();
            }
            None => {
                entries.insert(
                    url.to_owned(),
                    Entry {
                        file,
                        pending: 1,
                        at: Instant::now(),
                    },
                );
            }
        }
        Ok(size)
    }

    /// Takes the file spooled under `url` for one import; `None` when nothing was put there.
    pub fn claim(&self, url: &str) -> Option<Arc<TempPath>> {
        let mut entries = self.entries();
        let e = entries.get_mut(url)?;
        let file = e.file.clone();
        e.pending -= 1;
        if e.pending == 0 {
            entries.remove(url);
        }
        Some(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &'static [u8]) -> ByteStream {
        Box::pin(futures::stream::once(async move {
            Ok(bytes::Bytes::from_static(b))
        }))
    }

    #[tokio::test]
    async fn spooled_files_live_until_every_put_is_claimed() {
        let spool = Spool::default();
        assert!(spool.claim("nar/x.nar").is_none());
        assert_eq!(spool.put("nar/x.nar", bytes(b"abc")).await.unwrap(), 3);
        assert_eq!(spool.put("nar/x.nar", bytes(b"abc")).await.unwrap(), 3);
        let first = spool.claim("nar/x.nar").unwrap();
        let second = spool.claim("nar/x.nar").unwrap();
        assert!(spool.claim("nar/x.nar").is_none());
        assert_eq!(std::fs::read(&**first).unwrap(), b"abc");
        assert_eq!(std::fs::read(&**second).unwrap(), b"abc");
        let path = second.to_path_buf();
        drop((first, second));
        assert!(!path.exists(), "claimed files are deleted once used");

        let failing: ByteStream = Box::pin(futures::stream::once(async {
            Err(io::Error::other("upstream broke"))
        }));
        assert!(spool.put("nar/y.nar", failing).await.is_err());
        assert!(spool.claim("nar/y.nar").is_none());
    }
}
