//! The fixture of the push tests: a served cache folder taking pushes, and NARs and
//! narinfos made by hand to push into it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::common::{curl, nix32_sha256, Closure, Daemon, NixEnv};
use crate::{digest, file_url, serve_pushable};

/// A cache folder served with pushes allowed, and a closure built to push into it.
pub struct Bed {
    pub env: NixEnv,
    pub closure: Closure,
    /// The cache folder.
    pub cache: PathBuf,
    pub d: Daemon,
    /// The flags beyond `--allow-push` and the key, for a restart.
    extra: Vec<String>,
}

impl Bed {
    /// Serves the folder `cache` (relative to the environment) with `serve --allow-push`,
    /// signing with a key of its own, plus the flags `extra` makes (given the environment).
    pub fn new(cache: &str, extra: impl FnOnce(&NixEnv) -> Vec<String>) -> Bed {
        let env = NixEnv::new();
        let closure = env.build_closure();
        let (sk, _) = env.keypair("push-1");
        let extra = extra(&env);
        let flags: Vec<&str> = extra.iter().map(String::as_str).collect();
        let cache = env.path(cache);
        let d = serve_pushable(&env, &file_url(&cache), &sk, &flags);
        Bed {
            env,
            closure,
            cache,
            d,
            extra,
        }
    }

    /// Stops the server and starts another on the same cache: what it remembered is gone.
    pub fn restart(&mut self) {
        let flags: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let sk = self.env.path("push-1.sk");
        let store = format!("file://{}", self.cache.display());
        self.d = serve_pushable(&self.env, &store, &sk, &flags);
    }

    /// `curl -X PUT` of `body` to `path` below the server (sent as is, `..` included);
    /// returns the status and the response text.
    pub fn put(&self, path: &str, body: &[u8]) -> (u16, String) {
        let file = self.env.path("body");
        std::fs::write(&file, body).unwrap();
        let (code, text) = curl(&[
            "--path-as-is",
            "-X",
            "PUT",
            "-H",
            "Expect: 100-continue",
            "-H",
            &self.auth(),
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{}/{path}", self.d.url),
        ]);
        (code, String::from_utf8_lossy(&text).into_owned())
    }

    /// The `Authorization` header of this server's write credential.
    pub fn auth(&self) -> String {
        crate::common::credentials::bearer(&crate::common::credentials::push_writer(&self.env).0)
    }

    /// Pushes a path's NAR and then its narinfo, each expected to be taken.
    pub fn push(&self, p: &Pushed) {
        let (code, text) = self.put(&p.nar_url, &p.nar);
        assert_eq!(code, 200, "{text}");
        let (code, text) = self.put(&p.narinfo_key, p.narinfo.as_bytes());
        assert_eq!(code, 200, "{text}");
    }

    /// The status of a GET of `path` below the server.
    pub fn get(&self, path: &str) -> u16 {
        curl(&[&format!("{}/{path}", self.d.url)]).0
    }

    /// Whether the cache folder holds `key`.
    pub fn holds(&self, key: &str) -> bool {
        self.cache.join(key).exists()
    }

    /// Every file of the cache folder under `nar/`.
    pub fn nar_files(&self) -> Vec<String> {
        files(&self.cache)
            .into_iter()
            .filter(|f| f.starts_with("nar/"))
            .collect()
    }
}

/// A store path's NAR and the narinfo text Nix would push for it uncompressed.
pub struct Pushed {
    pub nar: Vec<u8>,
    pub nar_url: String,
    /// `<digest>.narinfo`.
    pub narinfo_key: String,
    pub narinfo: String,
}

pub fn uncompressed(env: &NixEnv, path: &str, refs: &[&str]) -> Pushed {
    let nar = env.dump(&env.real(path));
    let hash = nix32_sha256(&nar);
    let nar_url = format!("nar/{}.nar", hash.trim_start_matches("sha256:"));
    let refs: Vec<&str> = refs.iter().map(|r| &r["/nix/store/".len()..]).collect();
    let narinfo = format!(
        "StorePath: {path}\nURL: {nar_url}\nCompression: none\nFileHash: {hash}\nFileSize: {n}\nNarHash: {hash}\nNarSize: {n}\nReferences: {}\n",
        refs.join(" "),
        n = nar.len()
    );
    Pushed {
        nar,
        nar_url,
        narinfo_key: format!("{}.narinfo", digest(path)),
        narinfo,
    }
}

/// `xz -c` of bytes, as Nix compresses NARs by default.
pub fn xz(data: &[u8], scratch: &Path) -> Vec<u8> {
    let file = scratch.join("to-xz");
    std::fs::write(&file, data).unwrap();
    let out = std::process::Command::new("xz")
        .args(["-c", "-6"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Every file below `dir`, relative.
pub fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Sends a request whose body ends before its Content-Length, then closes the connection.
pub fn short_body(base: &str, auth: &str, path: &str, declared: usize, sent: &[u8]) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /{path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\nContent-Length: {declared}\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    // The server answers the expectation before any of the body is sent.
    let mut continued = [0u8; 25];
    s.read_exact(&mut continued).unwrap();
    assert!(
        String::from_utf8_lossy(&continued).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&continued)
    );
    s.write_all(sent).unwrap();
    s.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(s);
}
