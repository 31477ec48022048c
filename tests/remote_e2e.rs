//! End to end over every remote kind of store: a real Nix post-build hook feeds `upload`
//! pipelines into S3 (moto), GCS (fake-gcs-server), ssh (sshd) and a folder; real Nix then
//! substitutes from each (buckets through `nixcached serve`), with signatures checked.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::peers::{free_port, gcs_bucket, s3_bucket, s3_bucket_at, ssh_url, Moto};
use common::upload::{mkfifo, Upload};
use common::{Daemon, NixEnv};

const BIN: &str = env!("CARGO_BIN_EXE_nixcached");

/// An `upload --allow-finish` of a FIFO `NAME.fifo` into `dest`, with its own state folder.
fn start_upload(env: &NixEnv, name: &str, dest: &str, extra: &[&str]) -> (Upload, PathBuf) {
    let fifo = env.path(&format!("{name}.fifo"));
    mkfifo(&fifo);
    let state = env.path(&format!("state-{name}"));
    let mut args = vec!["--allow-finish", "--state-dir", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Upload::start(env, &fifo, dest, &args), fifo)
}

fn wait_exit(up: Upload, what: &str) {
    let log = up.log.clone();
    let status = up.wait();
    assert!(
        status.success(),
        "{what}: {status}\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn post_build_hook_uploads_everywhere_and_nix_substitutes_from_each() {
    let env = NixEnv::new();
    let (sk, pk) = env.keypair("e2e-1");
    // The chroot store must exist before the uploaders open its database.
    let seed = env.path("seed");
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(seed.join("x"), "seed").unwrap();
    env.add(&seed);

    let folder = env.path("folder");
    let s3 = s3_bucket("e2e");
    let gcs = gcs_bucket("e2e");
    let remote = env.path("remote-store");
    let ssh = ssh_url(&remote);
    let key = sk.to_str().unwrap();
    let pipelines = vec![
        ("folder", format!("file://{}", folder.display()), "zstd"),
        ("s3", s3.clone(), "xz"),
        ("gcs", gcs.clone(), "none"),
        ("ssh", ssh.clone(), "none"),
    ];
    let mut running = Vec::new();
    for (name, dest, comp) in &pipelines {
        let (child, fifo) = start_upload(
            &env,
            name,
            dest,
            &["--compression", comp, "--secret-key-file", key],
        );
        running.push((name.to_string(), child, fifo));
    }
    let fifos: Vec<String> = running
        .iter()
        .map(|(_, _, f)| f.display().to_string())
        .collect();
    let hook = env.path("hook.sh");
    let mut script = format!(
        "#!/bin/sh\nset -eu\nOUT=\"${{OUT_PATHS:-$(nix-store --store {} -q --outputs \"$DRV_PATH\")}}\"\n",
        env.store_arg()
    );
    for f in &fifos {
        script.push_str(&format!("{BIN} send -o {f} --timeout 60s $OUT\n"));
    }
    std::fs::write(&hook, script).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.set_nix_config(Some(format!("post-build-hook = {}", hook.display())));
    let closure = env.build_closure();
    env.set_nix_config(None);
    for (name, child, fifo) in running {
        let out = Command::new(BIN)
            .args(["send", "-o", fifo.to_str().unwrap(), "--finish"])
            .output()
            .unwrap();
        common::assert_succeeded(&out);
        wait_exit(child, &format!("upload to {name}"));
    }

    env.substitute_from(
        &format!("file://{}", folder.display()),
        &closure.app,
        &pk,
        "folder",
    );
    for (tag, url) in [("s3", &s3), ("gcs", &gcs)] {
        let d = Daemon::start(&env, &["serve", url]);
        env.substitute_from(&d.url, &closure.app, &pk, tag);
    }
    // The ssh destination is a real Nix store: Nix itself checks what landed there.
    env.verify(remote.to_str().unwrap(), Some(&*pk), &closure.app);
    let d = Daemon::start(&env, &["serve", &ssh]);
    env.substitute_from(&d.url, &closure.app, &pk, "ssh");
}

#[test]
fn serving_buckets_in_every_compression_to_real_nix() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let (sk, pk) = env.keypair("bucket-serve-1");
    for comp in ["zstd", "xz", "none"] {
        for (kind, url) in [("s3", s3_bucket(comp)), ("gcs", gcs_bucket(comp))] {
            let input = env.path(&format!("paths-{kind}-{comp}"));
            std::fs::write(&input, format!("{}\n", closure.app)).unwrap();
            let out = env
                .cmd(BIN)
                .args([
                    "upload",
                    "--input",
                    input.to_str().unwrap(),
                    "--compression",
                    comp,
                ])
                .args([
                    "--secret-key-file",
                    sk.to_str().unwrap(),
                    "--progress-interval",
                    "0",
                ])
                .args([
                    "--state-dir",
                    env.path(&format!("state-{kind}-{comp}")).to_str().unwrap(),
                ])
                .args(["--from", &format!("local?root={}", env.store_arg()), &url])
                .output()
                .unwrap();
            common::assert_succeeded(&out);
            let d = Daemon::start(&env, &["serve", &url]);
            env.substitute_from(&d.url, &closure.app, &pk, &format!("{kind}-{comp}"));
            let ls = env.run(
                "nix",
                &["store", "ls", "--store", &d.url, "-R", &closure.app],
            );
            assert!(ls.contains("./bin/hi"), "{ls}");
        }
    }
}

#[test]
fn s3_outage_mid_run_loses_nothing() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let port = free_port();
    let moto = Moto::start(port);
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let url = s3_bucket_at(&endpoint, "outage");
    let bucket = url
        .trim_start_matches("s3://")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let (child, fifo) = start_upload(&env, "outage", &url, &["--jobs", "2"]);
    // Once the uploader has written nix-cache-info it is past its start-up checks.
    let deadline = Instant::now() + Duration::from_secs(30);
    // moto checks no signature, but wants an Authorization header on private objects.
    let auth = "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
    while common::curl(&["-H", auth, &format!("{endpoint}/{bucket}/nix-cache-info")]).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "upload did not write nix-cache-info"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server goes away (and, being in-memory, comes back empty).
    drop(moto);
    let out = Command::new(BIN)
        .args([
            "send",
            "-o",
            fifo.to_str().unwrap(),
            "--timeout",
            "20s",
            &closure.app,
        ])
        .output()
        .unwrap();
    common::assert_succeeded(&out);
    std::thread::sleep(Duration::from_secs(3));
    let moto = Moto::start(port);
    let (code, _) = common::curl(&["-X", "PUT", &format!("{endpoint}/{bucket}")]);
    assert_eq!(code, 200);
    let out = Command::new(BIN)
        .args(["send", "-o", fifo.to_str().unwrap(), "--finish"])
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_exit(child, "upload across the outage");
    let d = Daemon::start(&env, &["serve", &url]);
    let fresh = env.path("fresh");
    env.copy_from(&d.url, fresh.to_str().unwrap(), None, &closure.app);
    env.verify(fresh.to_str().unwrap(), None, &closure.app);
    drop(moto);
}
