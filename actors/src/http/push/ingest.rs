//! Receiving pushed bodies: streamed into the store chunk by chunk (never held whole), hashed
//! as they pass, NARs decompressed on the side to hash the NAR inside, and the store's write
//! committed only when every check passed. A body that breaks off, stalls, grows past its
//! cap or fails a check reaches the store as a failed stream, so the store's atomic write
//! leaves nothing visible.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::time::Duration;

use actix_web::http::StatusCode;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_util::io::StreamReader;

use super::checks::{NarRecord, Refusal};
use crate::formats::hash::HashingCounter;
use crate::formats::{Compression, Hash};
use crate::nar_files::MAX_DECODER_WINDOW;
use crate::store::{ByteStream, StoreError};

/// Largest NAR taken, compressed or not, in bytes. Decompression is capped as well, so a
/// small file that expands without end (a compression bomb) costs at most this much hashing.
pub const MAX_PUSHED_NAR_BYTES: u64 = 64 << 30;

/// Longest a pushed body may send nothing before the push is abandoned: a client that stalls
/// must not hold a half-written file for ever.
pub const BODY_STALL: Duration = Duration::from_secs(60);

/// Chunks in flight between the body and the store (and the decompressor): a few, so memory
/// stays bounded by the body's chunk size whatever the NAR's size.
const IN_FLIGHT: usize = 4;

/// Why a body was not stored.
#[derive(Debug)]
pub enum Stop {
    /// The body or what was in it was refused.
    Refused(Refusal),
    /// The store failed while writing.
    Store(StoreError),
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Stop {
        Stop::Refused(r)
    }
}

/// How a body ended, as the feeder saw it.
enum Fed {
    /// Every byte went through: the file's hash and size, and whether the decompressor stopped
    /// reading before the end (bytes after the compressed data).
    Whole(Hash, u64, bool),
    /// The body was refused (broke off, stalled, too large).
    Refused(Refusal),
    /// The store stopped taking bytes: its own error says why.
    StoreGone,
}

/// The body's next chunk (`None` at its end), refusing a body that breaks off or sends
/// nothing for [`BODY_STALL`].
async fn next_chunk<S, E>(
    mut body: std::pin::Pin<&mut S>,
    what: &str,
) -> Result<Option<Bytes>, Refusal>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
{
    match tokio::time::timeout(BODY_STALL, body.next()).await {
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "{what}: the body sent nothing for {}s; nothing was stored, push it again",
                BODY_STALL.as_secs()
            ),
        )),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(Refusal::bad(format!(
            "{what}: the body broke off ({e}); nothing was stored, push it again"
        ))),
        Ok(Some(Ok(c))) => Ok(Some(c)),
    }
}

/// Feeds `body` to `store` (and a copy of each chunk to `tee`), hashing and counting it, up
/// to `cap` bytes. Returns how it ended, and the store's sender, kept open so the caller
/// decides whether the store's write completes or fails.
async fn feed<S, E>(
    body: S,
    what: &str,
    cap: u64,
    mut store: mpsc::Sender<io::Result<Bytes>>,
    mut tee: Option<mpsc::Sender<io::Result<Bytes>>>,
) -> (Fed, mpsc::Sender<io::Result<Bytes>>)
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
{
    let mut body = std::pin::pin!(body);
    let mut counter = HashingCounter::new();
    let mut tee_quit = false;
    loop {
        let chunk = match next_chunk(body.as_mut(), what).await {
            Err(r) => return (Fed::Refused(r), store),
            Ok(None) => break,
            Ok(Some(c)) => c,
        };
        counter.update(&chunk);
        if counter.len() > cap {
            let r = Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{what} is larger than the {cap} bytes this server takes; nothing was stored"
                ),
            );
            return (Fed::Refused(r), store);
        }
        if let Some(t) = tee.as_mut() {
            if t.send(Ok(chunk.clone())).await.is_err() {
                // The decompressor stopped; its own result says why.
                tee = None;
                tee_quit = true;
            }
        }
        if store.send(Ok(chunk)).await.is_err() {
            return (Fed::StoreGone, store);
        }
    }
    let (hash, size) = counter.finish();
    (Fed::Whole(hash, size, tee_quit), store)
}

/// Hashes and counts what `input` decompresses to, refusing more than the cap.
async fn hash_decompressed(
    input: ByteStream,
    compression: Compression,
) -> Result<(Hash, u64), Refusal> {
    let reader = tokio::io::BufReader::new(StreamReader::new(input));
    let mut decoder = compression.decoder_within(reader, MAX_DECODER_WINDOW);
    let mut counter = HashingCounter::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = decoder.read(&mut buf).await.map_err(|e| {
            Refusal::unprocessable(format!(
                "the NAR does not decompress as {compression} ({e}); give it the extension of its compression, or compress it with a smaller window"
            ))
        })?;
        if n == 0 {
            return Ok(counter.finish());
        }
        counter.update(&buf[..n]);
        if counter.len() > MAX_PUSHED_NAR_BYTES {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the NAR decompresses to more than the {MAX_PUSHED_NAR_BYTES} bytes this server takes"
                ),
            ));
        }
    }
}

/// Ends the store's stream: cleanly (the store commits) when `verdict` is good, with an
/// error (the store discards what it wrote) otherwise; then combines the verdict with the
/// store's own result.
async fn settle<T, U>(
    verdict: impl Future<Output = (Result<T, Stop>, mpsc::Sender<io::Result<Bytes>>)>,
    stored: impl Future<Output = Result<U, StoreError>>,
) -> Result<(T, U), Stop> {
    let checked = async {
        let (verdict, mut tx) = verdict.await;
        if let Err(e) = &verdict {
            let why = match e {
                Stop::Refused(r) => r.message.clone(),
                Stop::Store(e) => e.to_string(),
            };
            let _ = tx
                .send(Err(io::Error::new(io::ErrorKind::InvalidData, why)))
                .await;
        }
        drop(tx);
        verdict
    };
    match futures::join!(checked, stored) {
        (Ok(t), Ok(u)) => Ok((t, u)),
        (Err(e @ Stop::Refused(_)), _) => Err(e),
        (Err(Stop::Store(e)), _) | (Ok(_), Err(e)) => Err(Stop::Store(e)),
    }
}

/// Receives a NAR file compressed as `compression` into `sink`, hashing the file and the
/// NAR inside; `accept` sees the hashes before the sink's write may complete, and refusing
/// makes it fail. Returns the hashes and what the sink returned.
pub async fn ingest_nar<S, E, F, Fut>(
    body: S,
    what: &str,
    compression: Compression,
    accept: impl FnOnce(&NarRecord) -> Result<(), Refusal>,
    sink: F,
) -> Result<NarRecord, Stop>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
    F: FnOnce(ByteStream) -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    let (store_tx, store_rx) = mpsc::channel(IN_FLIGHT);
    // Uncompressed, the file is the NAR: its hash is taken once.
    let (tee, decoded) = if compression == Compression::None {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        (Some(tx), Some(hash_decompressed(Box::pin(rx), compression)))
    };
    let verdict = async {
        let decoding = async {
            match decoded {
                Some(d) => Some(d.await),
                None => None,
            }
        };
        let ((fed, tx), decoded) = futures::join!(
            feed(body, what, MAX_PUSHED_NAR_BYTES, store_tx, tee),
            decoding
        );
        let record = (|| {
            let (file_hash, file_size, tee_quit) = match fed {
                Fed::Whole(h, n, q) => (h, n, q),
                Fed::Refused(r) => return Err(Stop::Refused(r)),
                // The store's error is what the caller sees.
                Fed::StoreGone => {
                    return Err(Stop::Store(StoreError::backend(
                        what.to_owned(),
                        "the store stopped taking the body",
                    )))
                }
            };
            let (nar_hash, nar_size) = match decoded {
                None => (file_hash.clone(), file_size),
                Some(Err(r)) => return Err(Stop::Refused(r)),
                Some(Ok(_)) if tee_quit => {
                    return Err(Stop::Refused(Refusal::unprocessable(format!(
                        "{what} has bytes after its {compression} data; push the file as nix copy writes it"
                    ))))
                }
                Some(Ok(d)) => d,
            };
            let record = NarRecord {
                compression,
                file_hash,
                file_size,
                nar_hash,
                nar_size,
            };
            accept(&record)?;
            Ok(record)
        })();
        (record, tx)
    };
    settle(verdict, sink(Box::pin(store_rx)))
        .await
        .map(|(record, _)| record)
}

/// Receives a body of at most `cap` bytes into `sink`, which fails (and so writes nothing)
/// when the body breaks off, stalls or grows too large.
pub async fn ingest<S, E, F, Fut, U>(body: S, what: &str, cap: u64, sink: F) -> Result<U, Stop>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
    F: FnOnce(ByteStream) -> Fut,
    Fut: Future<Output = Result<U, StoreError>>,
{
    let (store_tx, store_rx) = mpsc::channel(IN_FLIGHT);
    let verdict = async {
        let (fed, tx) = feed(body, what, cap, store_tx, None).await;
        let verdict = match fed {
            Fed::Whole(..) => Ok(()),
            Fed::Refused(r) => Err(Stop::Refused(r)),
            Fed::StoreGone => Err(Stop::Store(StoreError::backend(
                what.to_owned(),
                "the store stopped taking the body",
            ))),
        };
        (verdict, tx)
    };
    settle(verdict, sink(Box::pin(store_rx)))
        .await
        .map(|((), u)| u)
}

/// Reads a small body whole, refusing more than `cap` bytes (by its announced length before
/// reading, and as it arrives) and anything but UTF-8.
pub async fn small_text<S, E>(
    body: S,
    what: &str,
    declared: Option<u64>,
    cap: usize,
) -> Result<String, Refusal>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
{
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{what} is larger than the {cap} bytes a real one ever takes; nothing was stored"
            ),
        )
    };
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while let Some(c) = next_chunk(body.as_mut(), what).await? {
        if out.len() + c.len() > cap {
            return Err(too_large());
        }
        out.extend_from_slice(&c);
    }
    String::from_utf8(out)
        .map_err(|_| Refusal::bad(format!("{what} is not UTF-8 text; nothing was stored")))
}

/// Hashes a stored NAR file again by reading it back (when what it hashed to when pushed is
/// no longer remembered, after a restart).
pub async fn rehash(
    blob: ByteStream,
    what: &str,
    compression: Compression,
) -> Result<NarRecord, Stop> {
    let context = format!("reading back {what}");
    let drain = |s: ByteStream| async move {
        crate::publish::drain(s)
            .await
            .map_err(|e| StoreError::backend(context, e))
    };
    ingest_nar(blob, what, compression, |_| Ok(()), drain).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: Vec<io::Result<Bytes>>) -> impl Stream<Item = io::Result<Bytes>> {
        futures::stream::iter(parts)
    }

    #[tokio::test]
    async fn hashes_file_and_nar_and_commits_only_when_accepted() {
        let nar = Bytes::from(vec![7u8; 300_000]);
        let xz = {
            let s: ByteStream = Box::pin(futures::stream::once(futures::future::ready(Ok(
                nar.clone()
            ))));
            let mut out = Vec::new();
            let mut z = Compression::Xz.compress_stream(s, None);
            while let Some(c) = z.next().await {
                out.extend_from_slice(&c.unwrap());
            }
            Bytes::from(out)
        };
        let stored = std::sync::Arc::new(std::sync::Mutex::new(None));
        let sink = |s: ByteStream| {
            let stored = stored.clone();
            async move {
                let r = crate::publish::drain(s).await;
                *stored.lock().unwrap() = Some(r.is_ok());
                r.map_err(|e| StoreError::backend("test", e))
            }
        };
        let rec = ingest_nar(
            body(vec![Ok(xz.clone())]),
            "t",
            Compression::Xz,
            |_| Ok(()),
            sink,
        )
        .await
        .unwrap();
        assert_eq!(rec.nar_hash, Hash::sha256_of(&nar));
        assert_eq!(rec.nar_size, nar.len() as u64);
        assert_eq!(rec.file_hash, Hash::sha256_of(&xz));
        assert_eq!(*stored.lock().unwrap(), Some(true));

        // Refused by the check: the store's stream fails, so an atomic write discards it.
        let refused = ingest_nar(
            body(vec![Ok(xz.clone())]),
            "t",
            Compression::Xz,
            |_| Err(Refusal::unprocessable("no")),
            sink,
        )
        .await;
        assert!(matches!(refused, Err(Stop::Refused(_))));
        assert_eq!(*stored.lock().unwrap(), Some(false));

        // A body that breaks off, and one that is not xz at all.
        let broke = ingest_nar(
            body(vec![Ok(xz.slice(..100)), Err(io::Error::other("reset"))]),
            "t",
            Compression::Xz,
            |_| Ok(()),
            sink,
        )
        .await;
        assert!(matches!(broke, Err(Stop::Refused(r)) if r.status == StatusCode::BAD_REQUEST));
        assert_eq!(*stored.lock().unwrap(), Some(false));
        let garbage = ingest_nar(
            body(vec![Ok(nar.clone())]),
            "t",
            Compression::Xz,
            |_| Ok(()),
            sink,
        )
        .await;
        assert!(
            matches!(garbage, Err(Stop::Refused(r)) if r.status == StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert_eq!(*stored.lock().unwrap(), Some(false));
    }
}
