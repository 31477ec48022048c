//! NAR streams from the remote store, each on a serve session of its own.
//!
//! A NAR occupies its session until its last byte is read, and the serve protocol cannot
//! interleave anything with it. Streaming NARs over the metadata connection would stall
//! every narinfo lookup behind the slowest download (a client reading a 1 GiB NAR at modem
//! speed), so each stream takes a session from this pool instead. A session whose NAR was read
//! to the end is clean and goes back to the pool (an ssh login costs 0.5-1 s); one abandoned
//! mid-NAR (a range that ends early, a client that went away) is killed, since the rest of its
//! NAR would have to be read to reuse it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::stream;
use tokio::io::AsyncReadExt;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::SshError;
use super::session::{Failure, Session};
use super::target::SshTarget;
use crate::store::ByteStream;

/// Most NARs streamed at once (one ssh process each).
const MAX_STREAMS: usize = 16;
/// Most ssh logins under way at once: sshd drops unauthenticated connections beyond its
/// `MaxStartups` (10 by default).
const MAX_LOGINS: usize = 4;
/// Most idle sessions kept.
const MAX_IDLE: usize = 4;
/// Idle sessions older than this are closed rather than reused.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Bytes read from ssh per chunk.
const CHUNK: usize = 64 * 1024;

/// Sessions for NAR streams.
pub struct DumpPool {
    target: Arc<SshTarget>,
    rt: Handle,
    idle: Mutex<Vec<Session>>,
    streams: Arc<Semaphore>,
    logins: Semaphore,
}

impl DumpPool {
    /// A pool for `target`, whose ssh processes live on `rt`.
    pub fn new(target: Arc<SshTarget>, rt: Handle) -> Arc<DumpPool> {
        Arc::new(DumpPool {
            target,
            rt,
            idle: Mutex::new(Vec::new()),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            logins: Semaphore::new(MAX_LOGINS),
        })
    }

    fn take_idle(&self) -> Option<Session> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut s) = idle.pop() {
            if s.idle_since.elapsed() < IDLE_LIMIT && s.is_alive() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, mut session: Session) {
        session.idle_since = std::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|s| s.idle_since.elapsed() < IDLE_LIMIT);
        if idle.len() < MAX_IDLE {
            idle.push(session);
        }
    }

    async fn login(&self) -> Result<Session, SshError> {
        let _permit = self.logins.acquire().await;
        Session::open(&self.target, &self.rt, false).await
    }

    /// Streams the NAR of `path`, which is `nar_size` bytes long. The stream fails (rather
    /// than ending early) when the connection breaks before the last byte.
    pub async fn dump(self: &Arc<Self>, path: &str, nar_size: u64) -> Result<ByteStream, SshError> {
        let permit =
            self.streams
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| SshError::Protocol {
                    host: self.target.destination(),
                    detail: "the store is closing".into(),
                })?;
        let mut session = match self.take_idle() {
            Some(s) => s,
            None => self.login().await?,
        };
        if let Err(f) = session.request_dump(path).await {
            // A pooled session can have died while idle; nothing was asked yet, so retry once.
            match f {
                Failure::Stale(_) => {
                    session = self.login().await?;
                    session
                        .request_dump(path)
                        .await
                        .map_err(Failure::into_error)?;
                }
                Failure::Broken(e) | Failure::NotSent(e) => return Err(e),
            }
        }
        Ok(nar_stream(session, nar_size, self.clone(), permit))
    }
}

/// What a NAR stream holds between chunks.
struct Reading {
    session: Session,
    left: u64,
    pool: Arc<DumpPool>,
    _permit: OwnedSemaphorePermit,
}

fn nar_stream(
    session: Session,
    nar_size: u64,
    pool: Arc<DumpPool>,
    permit: OwnedSemaphorePermit,
) -> ByteStream {
    let state = Reading {
        session,
        left: nar_size,
        pool,
        _permit: permit,
    };
    if nar_size == 0 {
        // Not a real NAR, but then there is nothing to read and the session is clean.
        state.pool.put_idle(state.session);
        return Box::pin(stream::empty());
    }
    Box::pin(stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        let want = st.left.min(CHUNK as u64) as usize;
        let mut buf = BytesMut::with_capacity(want);
        let read = tokio::time::timeout(
            super::session::STALL_TIMEOUT,
            (&mut *st.session.nar_reader())
                .take(want as u64)
                .read_buf(&mut buf),
        )
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the NAR stream stalled",
            ))
        });
        let err = match read {
            Ok(0) => std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            Ok(n) => {
                st.left -= n as u64;
                if st.left == 0 {
                    // Recycle at once: the consumer may never poll for the end.
                    let Reading { session, pool, .. } = st;
                    pool.put_idle(session);
                    return Some((Ok(buf.freeze()), None));
                }
                return Some((Ok(buf.freeze()), Some(st)));
            }
            Err(e) => e,
        };
        // The session is dropped (ssh killed) after this item; the stream then ends.
        let why = st.session.nar_failure(&err).await;
        Some((
            Err(std::io::Error::new(
                err.kind(),
                format!("NAR stream from {} broke: {why}", st.session.host()),
            )),
            None,
        ))
    }))
}
