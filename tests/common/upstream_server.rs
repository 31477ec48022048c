//! Upstream binary caches for tests: Python's `http.server` serving a folder the real Nix
//! filled, as static file servers behind real caches do, with ways to misbehave on NARs.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{curl, Daemon, NixEnv};

/// How the server answers `GET /nar/…`.
#[derive(Debug, Clone)]
pub enum NarMode {
    /// The file, in 16 KiB pieces with this pause (seconds) after each.
    Slow(f64),
    /// `302 Found` to this prefix followed by the request path.
    RedirectTo(String),
    /// `200` with no length and zeros for as long as the client reads.
    Endless,
}

const SERVER: &str = r#"
import functools, http.server, sys, time
mode, arg = sys.argv[2], sys.argv[3]
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/nar/") and mode == "redirect":
            self.send_response(302)
            self.send_header("Location", arg + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/nar/") and mode == "endless":
            # HTTP/1.0 without a length: the body ends only when the connection does.
            self.send_response(200)
            self.end_headers()
            piece = b"\0" * 65536
            sent = 0
            try:
                while True:
                    self.wfile.write(piece)
                    sent += len(piece)
            except Exception:
                print("ENDLESS-SENT %d" % sent, file=sys.stderr, flush=True)
            self.close_connection = True
            return
        super().do_GET()
    def copyfile(self, src, dst):
        delay = float(arg) if mode == "slow" else 0.0
        while True:
            b = src.read(16384)
            if not b:
                break
            dst.write(b)
            dst.flush()
            if delay and self.path.startswith("/nar/"):
                time.sleep(delay)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// A running Python file server.
pub struct PyServer {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl PyServer {
    /// Serves `dir`, sending NAR bodies in 16 KiB pieces with `delay_secs` after each.
    pub fn start(dir: &Path, delay_secs: f64) -> PyServer {
        PyServer::start_with(dir, NarMode::Slow(delay_secs))
    }

    /// Serves `dir`, answering NAR requests as `mode` says.
    pub fn start_with(dir: &Path, mode: NarMode) -> PyServer {
        let (mode, arg) = match mode {
            NarMode::Slow(d) => ("slow", d.to_string()),
            NarMode::RedirectTo(prefix) => ("redirect", prefix),
            NarMode::Endless => ("endless", String::new()),
        };
        let mut child = Command::new("python3")
            .args(["-u", "-c", SERVER, dir.to_str().unwrap(), mode, &arg])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut port = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let port: u16 = port.trim().parse().expect("python printed its port");
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                l2.lock().unwrap().push(line);
            }
        });
        PyServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// Requests in the access log that start with `request` (`GET /nar/…`).
    pub fn count(&self, request: &str) -> usize {
        let needle = format!("\"{request}");
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// [`PyServer::count`] once the log shows at least `want` such requests (it is read by a
    /// thread, a moment behind the responses), or after 3 s.
    pub fn count_at_least(&self, request: &str, want: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.count(request) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Room for a request too many to show up too.
        std::thread::sleep(Duration::from_millis(100));
        self.count(request)
    }

    /// Waits until the access log holds every request answered before this call: sends a
    /// marker request (a `HEAD`, which no `GET` count matches) and waits for its line, which
    /// the server logs after theirs. A count of zero means nothing only after this.
    pub fn settle(&self) {
        static MARKERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MARKERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let marker = format!("/settle-marker-{n}");
        curl(&["-I", &format!("{}{marker}", self.url)]);
        let needle = format!("\"HEAD {marker} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log.lock().unwrap().iter().any(|l| l.contains(&needle)) {
            assert!(
                Instant::now() < deadline,
                "the marker request {marker} never reached the access log"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`PyServer::count`] once the log has caught up ([`PyServer::settle`]).
    pub fn settled_count(&self, request: &str) -> usize {
        self.settle();
        self.count(request)
    }

    /// Every line the server logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The 32-character digest of a store path.
pub fn digest(path: &str) -> &str {
    &path["/nix/store/".len()..][..32]
}

/// The `URL:` of the narinfo nixcached serves for `path`.
pub fn nar_url(daemon: &Daemon, path: &str) -> String {
    nar_url_with(daemon, path, &[])
}

/// [`nar_url`] with more curl arguments (a credential, a CA).
pub fn nar_url_with(daemon: &Daemon, path: &str, curl_args: &[&str]) -> String {
    let target = format!("{}/{}.narinfo", daemon.url, digest(path));
    let mut args = curl_args.to_vec();
    args.push(&target);
    let (code, body) = curl(&args);
    assert_eq!(code, 200, "narinfo of {path}");
    String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL line")
        .to_owned()
}

/// A folder the real Nix filled with the closure of `path`, signed by `sk`.
pub fn nix_cache(env: &NixEnv, name: &str, sk: &Path, compression: &str, path: &str) -> PathBuf {
    let dir = env.path(name);
    env.copy_to(
        &format!(
            "file://{}?compression={compression}&secret-key={}",
            dir.display(),
            sk.display()
        ),
        &[path],
    );
    dir
}
