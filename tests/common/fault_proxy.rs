//! A fault-injecting HTTP/1.1 proxy to put in front of a real bucket server (moto,
//! fake-gcs-server): requests pass through untouched until a rule matches, and then get an
//! error answer, a connection reset partway through their body, or no answer at all.
//!
//! Each connection carries one request (the proxy asks both sides for `Connection: close`),
//! so a rule applies to exactly the requests it matches. Answers that name the server's own
//! address (a resumable upload's `Location`) are rewritten to the proxy's, so every later
//! request of the upload comes through it too.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a matching request gets instead of its real answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// An answer with this status and XML body, after the request body is read.
    Status(u16, &'static str),
    /// The request goes to the server, but both connections are reset after this many body
    /// bytes: the server sees a truncated request, the client a reset.
    ResetAfter(usize),
    /// No answer until the rule is cleared (the client's stall timeout should fire first).
    Stall,
}

/// S3's answer to a client that sends too fast.
pub const SLOW_DOWN: Fault = Fault::Status(
    503,
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
);

/// An internal error, as S3 and GCS give now and then.
pub const INTERNAL: Fault = Fault::Status(
    500,
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>",
);

#[derive(Debug)]
struct Rule {
    method: String,
    /// Matches when the request target contains every one of these.
    contains: Vec<String>,
    fault: Fault,
    /// Requests it still applies to; `None` until cleared.
    left: Option<usize>,
    hits: usize,
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    /// `METHOD target -> outcome` per request, for failure messages.
    seen: Mutex<Vec<String>>,
    stopping: AtomicBool,
}

/// The proxy; stops accepting when dropped.
pub struct FaultProxy {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (s, up) = (s.clone(), upstream.clone());
                std::thread::spawn(move || handle(conn, &up, addr, &s));
            }
        });
        FaultProxy { shared, addr }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Gives the next `times` requests (`None`: all, until [`FaultProxy::clear`]) with this
    /// method whose target contains each of `contains` the `fault`.
    pub fn inject(&self, method: &str, contains: &[&str], fault: Fault, times: Option<usize>) {
        self.shared.rules.lock().unwrap().push(Rule {
            method: method.to_owned(),
            contains: contains.iter().map(|c| c.to_string()).collect(),
            fault,
            left: times,
            hits: 0,
        });
    }

    /// Removes every rule: from now on everything passes (stalled requests are released).
    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// How many requests each rule (in the order injected) has given its fault to.
    pub fn hits(&self) -> Vec<usize> {
        self.shared
            .rules
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.hits)
            .collect()
    }

    /// Requests seen, in order, each with what happened to it.
    pub fn seen(&self) -> Vec<String> {
        self.shared.seen.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.clear();
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads up to the end of the request or response head; returns the head and what came after.
fn read_head(conn: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((buf, rest));
        }
        if buf.len() > 256 * 1024 {
            return None;
        }
        match conn.read(&mut piece) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
        }
    }
}

/// The head with any `Connection`/`Keep-Alive` header replaced by `Connection: close`, and
/// `from` replaced by `to` (the server's address by the proxy's, or back).
fn rewrite(head: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.trim_end_matches("\r\n\r\n").split("\r\n") {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        out.push_str(&line.replace(from, to));
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// Resets a connection (RST, not FIN), as a network fault does.
fn reset(conn: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn handle(mut client: TcpStream, upstream: &str, me: std::net::SocketAddr, s: &Shared) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    let Some((head, body_start)) = read_head(&mut client) else {
        return;
    };
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut parts = line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let fault = {
        let mut rules = s.rules.lock().unwrap();
        rules
            .iter_mut()
            .find(|r| {
                r.method == method
                    && r.contains.iter().all(|c| target.contains(c.as_str()))
                    && r.left != Some(0)
            })
            .map(|r| {
                r.hits += 1;
                if let Some(n) = r.left.as_mut() {
                    *n -= 1;
                }
                r.fault.clone()
            })
    };
    s.seen
        .lock()
        .unwrap()
        .push(format!("{method} {target} -> {fault:?}"));
    let me = me.to_string();
    match fault {
        None => forward(client, upstream, &me, &head, &body_start, None),
        Some(Fault::ResetAfter(n)) => forward(client, upstream, &me, &head, &body_start, Some(n)),
        Some(Fault::Status(code, body)) => {
            // Read the body first: answering mid-upload makes some clients see a reset.
            let mut left = content_length(&head)
                .unwrap_or(0)
                .saturating_sub(body_start.len());
            let mut sink = [0u8; 65536];
            while left > 0 {
                match client.read(&mut sink[..left.min(65536)]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left -= n,
                }
            }
            let answer = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(answer.as_bytes());
            let _ = client.shutdown(Shutdown::Both);
        }
        Some(Fault::Stall) => {
            // Hold the request until the rule goes or the client gives up.
            let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
            let mut sink = [0u8; 65536];
            loop {
                if s.rules.lock().unwrap().is_empty() || s.stopping.load(Ordering::Relaxed) {
                    break;
                }
                match client.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        }
    }
}

/// Passes one request and its answer through; with `reset_after`, resets both connections
/// once that many body bytes have gone up.
fn forward(
    mut client: TcpStream,
    upstream: &str,
    me: &str,
    head: &[u8],
    body_start: &[u8],
    reset_after: Option<usize>,
) {
    let Ok(mut server) = TcpStream::connect(upstream) else {
        reset(&client);
        return;
    };
    let mut up_head = rewrite(head, me, upstream);
    let limit = reset_after.unwrap_or(usize::MAX);
    let first = body_start.len().min(limit);
    up_head.extend_from_slice(&body_start[..first]);
    if server.write_all(&up_head).is_err() {
        reset(&client);
        return;
    }
    let mut sent = first;
    if reset_after.is_some() {
        let mut piece = [0u8; 65536];
        while sent < limit {
            match client.read(&mut piece[..(limit - sent).min(65536)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if server.write_all(&piece[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
            }
        }
        reset(&client);
        reset(&server);
        return;
    }
    // Request body up, answer down, at the same time (a server may answer early).
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(Shutdown::Write);
    });
    if let Some((head, rest)) = read_head(&mut server) {
        let mut down = rewrite(&head, upstream, me);
        down.extend_from_slice(&rest);
        if client.write_all(&down).is_ok() {
            let _ = std::io::copy(&mut server, &mut client);
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = up.join();
}
