//! A real headless Chromium driven over W3C WebDriver (Debian's `chromium` and
//! `chromium-driver`), with curl as the HTTP client, so no browser-automation crate is needed.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process with one browser session, both stopped when dropped.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

/// One WebDriver call; returns the `value` of the reply, panicking on WebDriver errors.
fn call(method: &str, url: &str, body: Option<Value>) -> Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "120", "-X", method, url]);
    if body.is_some() {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is installed by scripts/test");
    if let Some(b) = body {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b.to_string().as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "WebDriver {method} {url}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if let Some(err) = value.get("error") {
        panic!("WebDriver {method} {url}: {err}: {}", value["message"]);
    }
    value
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session; fails (never
    /// skips) when Chromium is missing.
    pub fn start(test: &str) -> Browser {
        for tool in ["chromium", "chromedriver"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                found,
                "{tool} is not installed: the explorer tests drive a real browser; run scripts/test \
                 (it installs Debian's chromium and chromium-driver) or apt-get install chromium chromium-driver"
            );
        }
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/test-artifacts/explorer")
            .join(test);
        std::fs::create_dir_all(&shots).unwrap();
        eprintln!("screenshots go to {}", shots.display());
        // chromedriver cannot take port 0: pick a free port, retry if another process takes it.
        for _attempt in 0..5 {
            let port = crate::common::peers::free_port();
            let mut driver = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver");
            let base = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut ready = false;
            while Instant::now() < deadline {
                if driver.try_wait().unwrap().is_some() {
                    break;
                }
                let out = Command::new("curl")
                    .args(["-s", "--max-time", "2", &format!("{base}/status")])
                    .output()
                    .unwrap();
                if serde_json::from_slice::<Value>(&out.stdout)
                    .is_ok_and(|v| v["value"]["ready"] == json!(true))
                {
                    ready = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ready {
                let _ = driver.kill();
                let _ = driver.wait();
                continue;
            }
            let profile = tempfile::Builder::new()
                .prefix("nixcached-chromium-")
                .tempdir()
                .unwrap();
            let args = [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1000",
                &format!("--user-data-dir={}", profile.path().display()),
            ];
            let caps = json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"args": args}
            }}});
            let v = call("POST", &format!("{base}/session"), Some(caps));
            let session = v["sessionId"].as_str().expect("session id").to_owned();
            return Browser {
                driver,
                base,
                session,
                _profile: profile,
                shots,
            };
        }
        panic!("chromedriver did not start on any of 5 free ports");
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/session/{}/{rest}", self.base, self.session)
    }

    /// Navigates and waits for the page to load.
    pub fn goto(&self, url: &str) {
        call("POST", &self.url("url"), Some(json!({ "url": url })));
    }

    /// Reloads the page.
    pub fn refresh(&self) {
        call("POST", &self.url("refresh"), Some(json!({})));
    }

    /// The current URL.
    pub fn current_url(&self) -> String {
        call("GET", &self.url("url"), None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The page's title.
    pub fn title(&self) -> String {
        call("GET", &self.url("title"), None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Every element matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        call(
            "POST",
            &self.url("elements"),
            Some(json!({"using": "css selector", "value": css})),
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Element(e[ELEMENT_KEY].as_str().unwrap().to_owned()))
        .collect()
    }

    /// The one element matching a CSS selector (panics with the page text otherwise).
    pub fn find(&self, css: &str) -> Element {
        let mut all = self.find_all(css);
        assert!(
            !all.is_empty(),
            "no element matches {css:?} on {}:\n{}",
            self.current_url(),
            self.body_text()
        );
        all.swap_remove(0)
    }

    /// The first element matching `css` whose text contains `needle`.
    pub fn find_with_text(&self, css: &str, needle: &str) -> Element {
        self.find_all(css)
            .into_iter()
            .find(|e| self.text(e).contains(needle))
            .unwrap_or_else(|| {
                panic!(
                    "no {css:?} containing {needle:?} on {}:\n{}",
                    self.current_url(),
                    self.body_text()
                )
            })
    }

    /// The rendered text of an element.
    pub fn text(&self, e: &Element) -> String {
        call("GET", &self.url(&format!("element/{}/text", e.0)), None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// An attribute of an element.
    pub fn attr(&self, e: &Element, name: &str) -> Option<String> {
        call(
            "GET",
            &self.url(&format!("element/{}/attribute/{name}", e.0)),
            None,
        )
        .as_str()
        .map(str::to_owned)
    }

    /// The whole page's rendered text.
    pub fn body_text(&self) -> String {
        let body = self.find_all("body");
        body.first().map(|b| self.text(b)).unwrap_or_default()
    }

    /// A real click (the browser follows links and submits forms itself).
    pub fn click(&self, e: &Element) {
        call(
            "POST",
            &self.url(&format!("element/{}/click", e.0)),
            Some(json!({})),
        );
    }

    /// Types into an input.
    pub fn type_into(&self, e: &Element, text: &str) {
        call(
            "POST",
            &self.url(&format!("element/{}/clear", e.0)),
            Some(json!({})),
        );
        call(
            "POST",
            &self.url(&format!("element/{}/value", e.0)),
            Some(json!({ "text": text })),
        );
    }

    /// A computed CSS property of an element (`background-color` → `rgb(…)`).
    pub fn css(&self, e: &Element, property: &str) -> String {
        call(
            "GET",
            &self.url(&format!("element/{}/css/{property}", e.0)),
            None,
        )
        .as_str()
        .unwrap()
        .to_owned()
    }

    /// Makes pages see `prefers-color-scheme: <scheme>` (Chrome DevTools emulation).
    pub fn color_scheme(&self, scheme: &str) {
        call(
            "POST",
            &self.url("goog/cdp/execute"),
            Some(json!({
                "cmd": "Emulation.setEmulatedMedia",
                "params": {"features": [{"name": "prefers-color-scheme", "value": scheme}]}
            })),
        );
    }

    /// Saves a PNG screenshot of the viewport as `<name>.png`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let v = call("GET", &self.url("screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session stops the browser; then stop the driver we started.
        let _ = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "10",
                "-X",
                "DELETE",
                &format!("{}/session/{}", self.base, self.session),
            ])
            .output();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
