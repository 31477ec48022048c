//! The programs in `examples/` run for real, and the real Nix checks what they produce.
//!
//! `scripts/test` builds the examples with `cargo build --examples` (`cargo test` alone compiles
//! them only as test harnesses) into `target/<profile>/examples/`, next to the `nixcached`
//! binary this test is given.

mod common;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::NixEnv;

/// The compiled example `name`.
fn example(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nixcached"));
    let path = bin
        .parent()
        .expect("the binary's folder")
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the examples with `cargo build --examples` (scripts/test does)",
        path.display()
    );
    path
}

/// Runs `upload_from_code` and returns its summary line.
fn upload(env: &NixEnv, dest: &str, paths: &[&str]) -> String {
    let out = env
        .cmd(example("upload_from_code").to_str().unwrap())
        .args(["--from", &format!("local?root={}", env.store_arg())])
        .arg(dest)
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "upload_from_code failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn upload_from_code_uploads_a_closure_that_nix_verifies_and_substitutes() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    assert_eq!(closure.paths.len(), 3, "app, lib and dep");
    let cache = format!("file://{}", env.path("cache").display());

    // Only the top path is named: the pipeline uploads its closure, references first.
    let summary = upload(&env, &cache, &[&closure.app]);
    assert!(
        summary.starts_with("uploaded 3, already present 0, failed 0,"),
        "{summary}"
    );
    // A second run finds everything in place.
    let summary = upload(&env, &cache, &[&closure.app, &closure.lib]);
    assert!(
        summary.starts_with("uploaded 0, already present 3, failed 0,"),
        "{summary}"
    );

    // Nix reads every NAR back from the cache and checks it against its narinfo.
    env.verify(&cache, None, &closure.app);
    // And substitutes the closure into an empty store (unsigned: the example signs nothing).
    let fresh = env.path("fresh");
    env.copy_from(&cache, fresh.to_str().unwrap(), None, &closure.app);
    env.verify(fresh.to_str().unwrap(), None, &closure.app);
}

/// A running `serve_two_stores`, stopped when dropped.
struct TwoStores {
    child: Child,
    url_a: String,
    url_b: String,
    seeded: String,
}

impl TwoStores {
    fn start(env: &NixEnv, store_a: &str) -> TwoStores {
        let mut child = env
            .cmd(example("serve_two_stores").to_str().unwrap())
            .args(["--store-a", store_a])
            .args(["--listen-a", "127.0.0.1:0", "--listen-b", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The program prints its addresses once both servers listen; read them on a thread
        // so that a program that never prints cannot hang the test.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[serve_two_stores] {line}");
                let _ = tx.send(line);
            }
        });
        let (mut url_a, mut url_b, mut seeded) = (None, None, None);
        while seeded.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("serve_two_stores did not print its addresses");
            let word = |n: usize| line.split_whitespace().nth(n).map(str::to_owned);
            if line.starts_with("store A: ") {
                url_a = word(2);
            } else if line.starts_with("store B: ") {
                url_b = word(2);
            } else if line.starts_with("store B holds ") {
                seeded = word(3).map(|p| p.trim_end_matches(';').to_owned());
            }
        }
        let trim = |u: Option<String>| u.unwrap().trim_end_matches('/').to_owned();
        TwoStores {
            child,
            url_a: trim(url_a),
            url_b: trim(url_b),
            seeded: seeded.unwrap(),
        }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for TwoStores {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_two_stores_serves_a_folder_and_a_seeded_memory_cache_to_nix() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let folder = format!("file://{}", env.path("cache").display());
    env.copy_to(&folder, &[&closure.app]);
    let servers = TwoStores::start(&env, &folder);

    // Store A: the folder's closure, substituted over HTTP by Nix.
    let (code, body) = common::curl(&[&format!("{}/nix-cache-info", servers.url_a)]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("StoreDir: /nix/store"));
    let fresh = env.path("fresh-a");
    env.copy_from(&servers.url_a, fresh.to_str().unwrap(), None, &closure.app);
    env.verify(fresh.to_str().unwrap(), None, &closure.app);

    // Store B: the object the example made in memory is the very path `nix-store --add`
    // gives the same folder, and Nix substitutes it without a signature because it is
    // content-addressed (Nix checks the path against the content).
    let tree = env.path("seed/nixcached-example");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(
        tree.join("hello.txt"),
        "Hello from an in-memory nixcached store.\n",
    )
    .unwrap();
    assert_eq!(env.add(&tree), servers.seeded);
    let fresh = env.path("fresh-b");
    env.run(
        "nix",
        &[
            "copy",
            "--from",
            &servers.url_b,
            "--to",
            fresh.to_str().unwrap(),
            &servers.seeded,
        ],
    );
    env.run(
        "nix",
        &[
            "store",
            "verify",
            "--store",
            fresh.to_str().unwrap(),
            "-r",
            &servers.seeded,
        ],
    );
    // Each listener serves its own store only.
    let digest = &servers.seeded["/nix/store/".len()..][..32];
    let (code, _) = common::curl(&[&format!("{}/{digest}.narinfo", servers.url_a)]);
    assert_eq!(code, 404);

    assert!(servers.stop().success(), "a clean stop on SIGTERM");
}

/// Runs `check_and_repair` and returns its exit code and output.
fn check_and_repair(env: &NixEnv, args: &[&str]) -> (i32, String) {
    let out = env
        .cmd(example("check_and_repair").to_str().unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_and_repair_finds_a_missing_nar_and_repairs_the_closure() {
    let env = NixEnv::new();
    let closure = env.build_closure();
    let dir = env.path("cache");
    let cache = format!("file://{}", dir.display());
    upload(&env, &cache, &[&closure.app]);
    let (code, out) = check_and_repair(&env, &["--verify-content", &cache]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 narinfos, 3 NAR files"), "{out}");

    // lib's NAR goes: lib is broken, and app, which references it, cannot be substituted.
    let lib_narinfo = dir.join(format!(
        "{}.narinfo",
        &closure.lib.rsplit('/').next().unwrap()[..32]
    ));
    let url = std::fs::read_to_string(&lib_narinfo)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    std::fs::remove_file(dir.join(url)).unwrap();
    let (code, out) = check_and_repair(&env, &[&cache]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing-nar: 1"), "{out}");

    let (code, out) = check_and_repair(&env, &["--repair", &cache]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("removed ").count(), 2, "lib and app: {out}");
    let (code, out) = check_and_repair(&env, &[&cache]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 narinfos, 2 NAR files"), "{out}");
    assert!(
        out.contains("orphan-nar: 1"),
        "app's NAR stays for gc: {out}"
    );
    // What is left is whole: Nix copies dep from it.
    let fresh = env.path("fresh");
    env.copy_from(&cache, fresh.to_str().unwrap(), None, &closure.dep);

    // dep's NAR goes too; given the local store, repair writes dep again instead of removing it.
    let dep_narinfo = dir.join(format!(
        "{}.narinfo",
        &closure.dep.rsplit('/').next().unwrap()[..32]
    ));
    let url = std::fs::read_to_string(&dep_narinfo)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    std::fs::remove_file(dir.join(url)).unwrap();
    let store = format!("local?root={}", env.store_arg());
    let (code, out) = check_and_repair(&env, &["--repair", "--from-store", &store, &cache]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("reuploaded ").count(), 1, "dep: {out}");
    assert_eq!(out.matches("removed ").count(), 0, "{out}");
    let (code, out) = check_and_repair(&env, &["--verify-content", &cache]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("missing-nar: 0"), "{out}");
    let fresh = env.path("fresh-2");
    env.copy_from(&cache, fresh.to_str().unwrap(), None, &closure.dep);
}
