//! Dropping clients that stop reading a response.
//!
//! actix-web bounds the time to send a request and the pause between keep-alive requests,
//! not a response whose client stops reading: such a client would hold its connection and
//! the response's producer (a NAR dump, a store read, a decoder) for as long as it likes.
//! Such a client also stops the body from being polled, so the body cannot notice by itself.
//! A watchdog task can: once the body has waited for the client for the idle timeout, it
//! shuts the connection's socket down, which wakes the connection with an error; actix-web
//! then drops the connection and the body with its producer.

use std::any::Any;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::dev::Extensions;
use actix_web::HttpRequest;
use tokio::sync::Notify;

/// What a connection's responses need to drop it: its socket and the idle timeout.
#[derive(Debug, Clone, Copy)]
struct Conn {
    fd: RawFd,
    idle: Duration,
}

/// For [`actix_web::HttpServer::on_connect`]: remembers each connection's socket, so that a
/// response whose client reads nothing for `idle` can drop it. A zero `idle` never drops.
pub fn on_connect(idle: Duration) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + Clone {
    move |conn, ext| {
        if idle.is_zero() {
            return;
        }
        let fd = if let Some(t) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            t.as_raw_fd()
        } else if let Some(u) = conn.downcast_ref::<actix_web::rt::net::UnixStream>() {
            u.as_raw_fd()
        } else if let Some(t) = conn.downcast_ref::<actix_tls::accept::rustls_0_23::TlsStream<
            actix_web::rt::net::TcpStream,
        >>() {
            // Shutting the TCP socket under TLS down wakes the connection just the same.
            t.get_ref().0.as_raw_fd()
        } else {
            return;
        };
        ext.insert(Conn { fd, idle });
    }
}

/// What the body and its watchdog share.
struct Watch {
    start: Instant,
    /// When the body last handed out a chunk (ms since `start`).
    handed: AtomicU64,
    /// True from a chunk handed out until the body is polled again: the client's turn.
    clients_turn: AtomicBool,
    /// The body is gone (finished or dropped): the watchdog must stop and must not touch the
    /// socket, which may be closed.
    done: AtomicBool,
    gone: Notify,
}

/// A response body that a watchdog drops when its client reads nothing for the timeout.
pub struct Guarded<S> {
    inner: S,
    watch: Option<Arc<Watch>>,
}

/// Wraps a response body of `req` in the idle watchdog of its connection (if it has one).
/// Call it where the response is made, on the connection's worker thread.
pub fn guard<S>(req: &HttpRequest, body: S) -> Guarded<S> {
    let Some(conn) = req.conn_data::<Conn>().copied() else {
        return Guarded {
            inner: body,
            watch: None,
        };
    };
    let watch = Arc::new(Watch {
        start: Instant::now(),
        handed: AtomicU64::new(0),
        // The headers are the first thing the client must take.
        clients_turn: AtomicBool::new(true),
        done: AtomicBool::new(false),
        gone: Notify::new(),
    });
    let w = watch.clone();
    let what = format!("{} {}", req.method(), req.path());
    // On the worker's own thread: the connection (and so the socket) lives as long as its
    // body, and the body cannot be dropped between the watchdog's check and its shutdown.
    actix_web::rt::spawn(async move {
        let mut wait = conn.idle;
        loop {
            tokio::select! {
                _ = w.gone.notified() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if w.done.load(Ordering::Acquire) {
                return;
            }
            let since = Duration::from_millis(w.handed.load(Ordering::Acquire));
            let idle_for = w.start.elapsed().saturating_sub(since);
            if w.clients_turn.load(Ordering::Acquire) && idle_for >= conn.idle {
                tracing::info!(
                    "{what}: the client read nothing for {}; dropping it",
                    humantime::format_duration(conn.idle)
                );
                // SAFETY: `done` is false, so the body lives, so its connection and socket
                // do; shutdown only ends the connection, it closes no descriptor.
                unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
                return;
            }
            wait = if w.clients_turn.load(Ordering::Acquire) {
                conn.idle.saturating_sub(idle_for)
            } else {
                conn.idle
            }
            .max(Duration::from_millis(10));
        }
    });
    Guarded {
        inner: body,
        watch: Some(watch),
    }
}

impl<S> Drop for Guarded<S> {
    fn drop(&mut self) {
        if let Some(w) = &self.watch {
            w.done.store(true, Ordering::Release);
            w.gone.notify_one();
        }
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for Guarded<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if let Some(w) = &self.watch {
            // Waiting on the producer (a slow store) is not the client's doing.
            w.clients_turn.store(false, Ordering::Release);
        }
        let r = Pin::new(&mut self.inner).poll_next(cx);
        if let (Poll::Ready(Some(_)), Some(w)) = (&r, &self.watch) {
            let now = w.start.elapsed().as_millis() as u64;
            w.handed.store(now, Ordering::Release);
            w.clients_turn.store(true, Ordering::Release);
        }
        r
    }
}
