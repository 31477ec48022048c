//! One process from a config file: several caches and upload pipelines, used by real Nix.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{curl, NixEnv};

/// A child process stopped when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Caches in one process: the chroot local store at the root, a folder under /folder, an S3
/// bucket (moto) on its own listener, and an upstream HTTP cache under /mirror; one pipeline
/// uploads to the bucket, the other to a folder. A real Nix substitutes from each cache.
#[test]
fn four_caches_and_two_pipelines_in_one_process() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("config-1");
    let folder = env.path("folder-cache");
    env.copy_to(
        &format!(
            "file://{}?compression=xz&secret-key={}",
            folder.display(),
            sk.display()
        ),
        &[&closure.app],
    );
    // An upstream binary cache: a plain HTTP server over a folder Nix filled.
    let upstream_dir = env.path("upstream-cache");
    env.copy_to(
        &format!(
            "file://{}?compression=zstd&secret-key={}",
            upstream_dir.display(),
            sk.display()
        ),
        &[&closure.lib],
    );
    let port = common::peers::free_port();
    let _upstream = KillOnDrop(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(&upstream_dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let upstream_url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl(&[&format!("{upstream_url}/nix-cache-info")]).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "python http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (s3_endpoint, bucket) = common::peers::new_s3_bucket("config");
    let s3 = format!("s3://{bucket}?endpoint={s3_endpoint}&region=us-east-1");
    let (fifo1, fifo2) = (env.path("up1.fifo"), env.path("up2.fifo"));
    for f in [&fifo1, &fifo2] {
        assert!(Command::new("mkfifo").arg(f).status().unwrap().success());
    }
    let dest2 = env.path("dest2");
    let config = env.path("nixcached.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = ["127.0.0.1:0"]

[[cache]]
store = "local?root={store}"
secret-key-files = ["{sk}"]

[[cache]]
store = "file://{folder}"
prefix = "/folder"

[[cache]]
store = "{s3}"
listen = ["127.0.0.1:0"]

[[cache]]
store = "{upstream_url}"
prefix = "/mirror"
trusted-public-keys = ["{pk}"]
upstream-timeout = "3s"
nar-cache-dir = "{nars}"
nar-cache-size-mib = 16

[[upload]]
input = "{fifo1}"
dest = "{s3}"
from = "local?root={store}"
state-dir = "{state}/1"
secret-key-files = ["{sk}"]
allow-finish = true

[[upload]]
input = "{fifo2}"
dest = "file://{dest2}"
from = "local?root={store}"
state-dir = "{state}/2"
compression = "xz"
allow-finish = true
"#,
            store = env.store_arg(),
            sk = sk.display(),
            folder = folder.display(),
            nars = env.path("nars").display(),
            fifo1 = fifo1.display(),
            fifo2 = fifo2.display(),
            dest2 = dest2.display(),
            state = env.path("state").display(),
        ),
    )
    .unwrap();
    // Killed if the test fails half-way; stopped with SIGTERM at the end otherwise.
    let mut daemon = KillOnDrop(
        env.cmd(env!("CARGO_BIN_EXE_nixcached"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // "Listening on http://127.0.0.1:P/prefix/ serving DESCRIPTION", one per cache.
    let stderr = daemon.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("[nixcached] {line}");
            if let Some(i) = line.find("Listening on ") {
                let rest = &line[i + "Listening on ".len()..];
                if let Some((url, desc)) = rest.split_once(" serving ") {
                    let _ = tx.send((desc.to_owned(), url.trim_end_matches('/').to_owned()));
                }
            }
        }
    });
    let mut urls = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while urls.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (desc, url) = rx.recv_timeout(left).expect("four caches listening");
        urls.insert(desc, url);
    }
    let url_of = |needle: &str| {
        urls.iter()
            .find(|(d, _)| d.contains(needle))
            .map(|(_, u)| u.clone())
            .unwrap()
    };
    let local_url = url_of("local?root=");
    let folder_url = url_of("folder-cache");
    let s3_url = url_of(&format!("s3://{bucket}"));
    let mirror_url = url_of(&upstream_url);
    assert!(folder_url.ends_with("/folder"), "{folder_url}");
    assert!(mirror_url.ends_with("/mirror"), "{mirror_url}");

    let substitute = |i: usize, url: &str, path: &str| {
        let fresh = env.path(&format!("fresh{i}"));
        env.realise_from(fresh.to_str().unwrap(), url, &pk, path);
        assert!(
            fresh.join(path.trim_start_matches('/')).exists(),
            "substituted {path} from {url}"
        );
    };
    substitute(0, &local_url, &closure.app);
    substitute(1, &folder_url, &closure.app);
    substitute(3, &mirror_url, &closure.lib);

    // Both pipelines upload what they are sent, then stop at the finish marker.
    let bin = env!("CARGO_BIN_EXE_nixcached");
    for f in [&fifo1, &fifo2] {
        let out = Command::new(bin)
            .args([
                "send",
                "-o",
                f.to_str().unwrap(),
                "--timeout",
                "20s",
                &closure.app,
            ])
            .output()
            .unwrap();
        common::assert_succeeded(&out);
    }
    let narinfo = format!("{}.narinfo", &closure.app["/nix/store/".len()..][..32]);
    let deadline = Instant::now() + Duration::from_secs(60);
    // moto lists a bucket without credentials: see the upload land there.
    let in_bucket = || {
        let (code, body) = curl(&[&format!("{s3_endpoint}/{bucket}?prefix={narinfo}")]);
        code == 200 && String::from_utf8_lossy(&body).contains(&format!("<Key>{narinfo}</Key>"))
    };
    while !(dest2.join(&narinfo).is_file() && in_bucket()) {
        assert!(Instant::now() < deadline, "the pipelines did not upload");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every cache's /metrics counts the pipelines' work: each wrote the whole closure.
    let written = |dest: &str| {
        let (code, body) = curl(&[&format!("{local_url}/metrics")]);
        assert_eq!(code, 200);
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .find(|l| l.starts_with("nixcached_upload_uploaded_total{") && l.contains(dest))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no upload counter for {dest}:\n{text}"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while written(&dest2.display().to_string()) < closure.paths.len()
        || written(&bucket) < closure.paths.len()
    {
        assert!(
            Instant::now() < deadline,
            "the upload counters never reached the closure"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(written(&dest2.display().to_string()), closure.paths.len());
    let (_, body) = curl(&[&format!("{s3_url}/metrics")]);
    let text = String::from_utf8_lossy(&body);
    for series in [
        "nixcached_upload_queued{",
        "nixcached_upload_bytes_total{",
        "nixcached_upload_retries_total{",
    ] {
        assert_eq!(
            text.matches(series).count(),
            2,
            "{series} per pipeline:\n{text}"
        );
    }
    // What the first pipeline put in the bucket, substituted from the S3 cache.
    substitute(2, &s3_url, &closure.app);
    env.verify(&format!("file://{}", dest2.display()), None, &closure.app);

    assert!(Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status}");
}
