//! A NAR of a file-system tree as an async byte stream, pulled by its consumer (feature
//! `tokio`).

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;

use super::dumper::Dumper;

/// A NAR produced as it is consumed: each piece is made by one short blocking call
/// ([`Dumper::fill`]) when the consumer asks for it, with one piece made ahead so that
/// reading the disk and sending overlap.
///
/// A consumer that stops reading holds at most two pieces ([`PIECE`] bytes each) and no
/// thread; dropping the stream stops production after the piece under way.
pub struct NarStream {
    state: State,
}

/// Bytes one blocking call produces.
const PIECE: usize = 128 * 1024;

type Made = (Box<Dumper>, io::Result<Vec<u8>>);

enum State {
    /// A piece is being made (the dumper is on a blocking thread with it).
    Making(tokio::task::JoinHandle<Made>),
    /// Every byte was handed out, or the NAR failed.
    Done,
}

fn make(mut dumper: Box<Dumper>) -> tokio::task::JoinHandle<Made> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(PIECE);
        let r = dumper.fill(&mut out, PIECE).map(|()| out);
        (dumper, r)
    })
}

impl Stream for NarStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let State::Making(handle) = &mut self.state else {
            return Poll::Ready(None);
        };
        let (dumper, made) = match std::task::ready!(Pin::new(handle).poll(cx)) {
            Ok(m) => m,
            Err(e) => {
                self.state = State::Done;
                return Poll::Ready(Some(Err(io::Error::other(format!(
                    "the NAR producer stopped: {e}"
                )))));
            }
        };
        match made {
            Ok(piece) => {
                // The next piece is made while this one is sent.
                self.state = if dumper.is_done() {
                    State::Done
                } else {
                    State::Making(make(dumper))
                };
                if piece.is_empty() {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(Bytes::from(piece))))
            }
            Err(e) => {
                self.state = State::Done;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

impl Drop for NarStream {
    fn drop(&mut self) {
        // The piece under way is finished and dropped on its thread; nothing waits for it.
        if let State::Making(h) = &self.state {
            h.abort();
        }
    }
}

/// Streams the NAR of `path` in bounded memory; an error while archiving ends the stream
/// with that error, so a consumer never mistakes a truncated NAR for a whole one. Must be
/// called inside a tokio runtime.
pub fn dump_stream(path: PathBuf) -> NarStream {
    NarStream {
        state: State::Making(make(Box::new(Dumper::new(path)))),
    }
}
