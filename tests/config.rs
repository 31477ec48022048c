//! One process from a config file: several caches and upload pipelines, used by real Nix.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::NixEnv;

#[test]
fn three_caches_and_two_pipelines_in_one_process() {
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
    let other = env.path("other-cache");
    env.copy_to(
        &format!(
            "file://{}?compression=zstd&secret-key={}",
            other.display(),
            sk.display()
        ),
        &[&closure.lib],
    );
    let (fifo1, fifo2) = (env.path("up1.fifo"), env.path("up2.fifo"));
    for f in [&fifo1, &fifo2] {
        assert!(Command::new("mkfifo").arg(f).status().unwrap().success());
    }
    let (dest1, dest2) = (env.path("dest1"), env.path("dest2"));
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
store = "file://{other}"
listen = ["127.0.0.1:0"]

[[upload]]
input = "{fifo1}"
dest = "file://{dest1}"
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
            other = other.display(),
            fifo1 = fifo1.display(),
            fifo2 = fifo2.display(),
            dest1 = dest1.display(),
            dest2 = dest2.display(),
            state = env.path("state").display(),
        ),
    )
    .unwrap();
    let mut child = env
        .cmd(env!("CARGO_BIN_EXE_nixcached"))
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "Listening on http://127.0.0.1:P/prefix/ serving DESCRIPTION", one per cache.
    let stderr = child.stderr.take().unwrap();
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
    while urls.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (desc, url) = rx.recv_timeout(left).expect("three caches listening");
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
    let other_url = url_of("other-cache");
    assert!(folder_url.ends_with("/folder"), "{folder_url}");

    for (i, (url, path)) in [
        (&local_url, &closure.app),
        (&folder_url, &closure.app),
        (&other_url, &closure.lib),
    ]
    .into_iter()
    .enumerate()
    {
        let fresh = env.path(&format!("fresh{i}"));
        env.realise_from(fresh.to_str().unwrap(), url, &pk, path);
        assert!(
            fresh.join(path.trim_start_matches('/')).exists(),
            "substituted {path} from {url}"
        );
    }

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
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for d in [&dest1, &dest2] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d
            .join(format!(
                "{}.narinfo",
                &closure.app["/nix/store/".len()..][..32]
            ))
            .is_file()
        {
            assert!(
                Instant::now() < deadline,
                "pipeline to {} did not upload",
                d.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    env.verify(
        &format!("file://{}", dest1.display()),
        Some(&*pk),
        &closure.app,
    );
    env.verify(&format!("file://{}", dest2.display()), None, &closure.app);

    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
