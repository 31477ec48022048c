//! A file's bytes out of a NAR that must be decompressed and parsed to reach them, produced
//! only as the client pulls them.
//!
//! Finding the file is one pass of the streaming NAR reader over the decompressed NAR, on a
//! blocking thread (decoding is CPU work and the reader is synchronous) but without the
//! client: it ends at the file's first byte. From there the decoder is polled by the response
//! itself, one chunk per poll, so a client that stops reading stops the decoding and holds no
//! thread. The live decoder sits in a decoder slot ([`super::slots`]); when a stalled
//! client's slot is taken, its stream keeps only its position and reopens the NAR there
//! (skipping to it on a blocking thread) once it is polled again.

use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use actix::Addr;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncRead;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::slots::{Held, Slots};
use super::{corrupt, mailbox, nar_failure};
use crate::fetcher::{Fetcher, OpenNar};
use crate::formats::nar::{self, NarVisitor};
use crate::formats::NarInfo;
use crate::store::StoreError;

/// Bytes per chunk handed to the response: what one poll decodes.
const CHUNK: usize = 64 * 1024;
/// Buffer between the store's byte stream and the decoder.
const SOURCE_BUF: usize = 64 * 1024;
/// Buffer of the blocking reader that seeks; what it read past the seek goes to the stream.
const SEEK_BUF: usize = 64 * 1024;

/// The decoder slots of one store's file views.
pub(crate) type Pool = Slots<Live>;

/// A decoder positioned in a file's contents, and what was already decoded past the position.
pub(crate) struct Live {
    pending: Bytes,
    reader: Pin<Box<dyn AsyncRead + Send>>,
}

impl Live {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            let n = want.min(self.pending.len());
            return Poll::Ready(Ok(self.pending.split_to(n)));
        }
        let mut buf = BytesMut::with_capacity(want);
        match tokio_util::io::poll_read_buf(self.reader.as_mut(), cx, &mut buf) {
            Poll::Ready(Ok(_)) => {
                buf.truncate(want);
                Poll::Ready(Ok(buf.freeze()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The NAR a file view reads, and the file in it.
struct Target {
    fetcher: Addr<Fetcher>,
    info: NarInfo,
    path: Vec<u8>,
    /// Largest decoder window accepted.
    window: u64,
}

/// Where a seek ends.
#[derive(Clone, Copy)]
enum Seek {
    /// At byte `start` of the file's contents, found by the NAR reader.
    Find { start: u64 },
    /// At this byte of the decompressed NAR (a file found before).
    To(u64),
}

/// Set when the stream that waits for a seek is dropped, so that the blocking thread stops.
struct Abandon(Arc<AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads until its stream is abandoned.
struct Abandonable<R> {
    inner: R,
    abandoned: Arc<AtomicBool>,
}

impl<R: Read> Read for Abandonable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.abandoned.load(Ordering::Relaxed) {
            return Err(io::Error::other("the client went away"));
        }
        self.inner.read(buf)
    }
}

/// Counts what the NAR reader consumes: the count at the wanted file is its offset.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Stops the NAR reader at the wanted file's first byte.
struct Stop<'a> {
    path: &'a [u8],
    found: bool,
}

impl NarVisitor for Stop<'_> {
    fn file(&mut self, path: &[u8], _: bool, _: u64, _: &mut dyn Read) -> io::Result<()> {
        if path != self.path {
            return Ok(());
        }
        self.found = true;
        Err(io::Error::other(
            "nixcached: the file's contents start here",
        ))
    }
}

/// Opens the NAR and positions a decoder as `seek` says; answers it and the offset of the
/// file's contents in the NAR.
async fn seek(target: &Target, seek: Seek) -> Result<(Live, u64), StoreError> {
    let blob = target
        .fetcher
        .send(OpenNar {
            url: target.info.url.clone(),
            range: None,
        })
        .await
        .map_err(mailbox)??;
    let raw = tokio::io::BufReader::with_capacity(SOURCE_BUF, StreamReader::new(blob.stream));
    let decoder = target.info.compression.decoder_within(raw, target.window);
    let bridge = SyncIoBridge::new(decoder);
    let abandoned = Arc::new(AtomicBool::new(false));
    let _abandon = Abandon(abandoned.clone());
    let what = target.info.store_path.to_string();
    let path = target.path.clone();
    let nar_size = target.info.nar_size;
    tokio::task::spawn_blocking(move || {
        let mut r = io::BufReader::with_capacity(
            SEEK_BUF,
            Abandonable {
                inner: bridge,
                abandoned,
            },
        );
        let (offset, skip) = match seek {
            Seek::Find { start } => {
                let mut counted = Counted {
                    inner: &mut r,
                    n: 0,
                };
                let mut stop = Stop {
                    path: &path,
                    found: false,
                };
                let read = nar::read_at_most(&mut counted, &mut stop, nar_size);
                if !stop.found {
                    return Err(match read {
                        Ok(_) => StoreError::NotFound("the file is not in the NAR".into()),
                        Err(e) => nar_failure(&what, e),
                    });
                }
                (counted.n, start)
            }
            Seek::To(at) => (0, at),
        };
        let skipped = io::copy(&mut (&mut r).take(skip), &mut io::sink())
            .map_err(|e| nar_failure(&what, e.into()))?;
        if skipped < skip {
            return Err(corrupt(&what, "the NAR ends inside the file"));
        }
        let pending = Bytes::copy_from_slice(r.buffer());
        let reader = r.into_inner().inner.into_inner();
        Ok((Live { pending, reader }, offset))
    })
    .await
    .map_err(|e| StoreError::backend("NAR reader thread", e.to_string()))?
}

enum State {
    Reading(Held<Live>),
    Opening(Pin<Box<dyn Future<Output = io::Result<Held<Live>>> + Send>>),
    Done,
}

/// The bytes `span` of a file in a NAR, decoded as they are pulled.
pub(crate) struct FileStream {
    target: Arc<Target>,
    pool: Arc<Pool>,
    /// Where the file's contents start in the decompressed NAR.
    offset: u64,
    /// The next byte of the file to hand out, and the end of the span.
    pos: u64,
    end: u64,
    state: State,
}

/// Finds the file at `path` in the NAR of `info` and positions a decoder at byte `span.0`
/// of it; errors (no such file, a corrupt NAR, a window over `window`) come here, before any
/// byte is sent.
pub(crate) async fn open(
    pool: &Arc<Pool>,
    fetcher: &Addr<Fetcher>,
    info: &NarInfo,
    path: Vec<u8>,
    span: (u64, u64),
    window: u64,
) -> Result<FileStream, StoreError> {
    let target = Arc::new(Target {
        fetcher: fetcher.clone(),
        info: info.clone(),
        path,
        window,
    });
    let held = pool.acquire().await;
    let (live, offset) = seek(&target, Seek::Find { start: span.0 }).await?;
    held.fill(live);
    Ok(FileStream {
        target,
        pool: pool.clone(),
        offset,
        pos: span.0,
        end: span.1,
        state: State::Reading(held),
    })
}

impl FileStream {
    /// Waits for a slot and reopens the NAR at the next byte to hand out.
    fn reopen(&self) -> State {
        let target = self.target.clone();
        let pool = self.pool.clone();
        let at = self.offset + self.pos;
        State::Opening(Box::pin(async move {
            let held = pool.acquire().await;
            let (live, _) = seek(&target, Seek::To(at))
                .await
                .map_err(io::Error::other)?;
            held.fill(live);
            Ok(held)
        }))
    }
}

impl futures::Stream for FileStream {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.pos >= this.end {
                // Gives the slot back at once, not when the response is dropped.
                this.state = State::Done;
            }
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Opening(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(held)) => this.state = State::Reading(held),
                    Poll::Ready(Err(e)) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Reading(held) => {
                    let want = (this.end - this.pos).min(CHUNK as u64) as usize;
                    match held.with(cx, |live, cx| live.poll_chunk(cx, want)) {
                        // The pool took the decoder while the client was not reading.
                        None => this.state = this.reopen(),
                        Some(Poll::Pending) => return Poll::Pending,
                        Some(Poll::Ready(Ok(b))) if b.is_empty() => {
                            this.state = State::Done;
                            let e = io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the NAR ends inside the file",
                            );
                            return Poll::Ready(Some(Err(e)));
                        }
                        Some(Poll::Ready(Ok(b))) => {
                            this.pos += b.len() as u64;
                            return Poll::Ready(Some(Ok(b)));
                        }
                        Some(Poll::Ready(Err(e))) => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }
}
