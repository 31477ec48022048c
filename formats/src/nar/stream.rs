//! A NAR produced on a blocking thread and consumed as an async byte stream (feature `tokio`).

use std::io::{self, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::sync::mpsc;

use super::writer::dump;

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
