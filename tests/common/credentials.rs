//! Credentials for the tests of private and writable caches: made by the binary's own
//! `credential new`, so only hashes are ever written to a file.

use std::process::Command;

use super::NixEnv;

/// Runs `nixcached credential new ARGS`; returns (token, the TOML entry it printed).
pub fn new_credential(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nixcached"))
        .args(["credential", "new"])
        .args(args)
        .output()
        .unwrap();
    super::assert_succeeded(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    // The token is the second comment line, alone.
    let token = text
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("# ")
        .to_owned();
    assert_eq!(token.len(), 64, "{text}");
    let entry = text
        .lines()
        .skip_while(|l| !l.starts_with("[["))
        .collect::<Vec<_>>()
        .join("\n");
    (token, entry + "\n")
}

/// A `--credentials` file of these entries (printed for a config's `[[cache]]`).
pub fn credentials_file(env: &NixEnv, name: &str, entries: &[&str]) -> String {
    let path = env.path(name);
    let text = entries
        .iter()
        .map(|e| e.replace("[[cache.credential]]", "[[credential]]"))
        .collect::<String>();
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// The write credential of `env`'s pushable servers, made once: the token is kept in the
/// environment, the `--credentials` file holds its hash, and the environment's Nix sends it
/// from a netrc file. Returns (token, credentials file).
pub fn push_writer(env: &NixEnv) -> (String, String) {
    let token_file = env.path("push-token");
    let creds = env.path("push-credentials").display().to_string();
    if let Ok(token) = std::fs::read_to_string(&token_file) {
        return (token, creds);
    }
    let (token, entry) = new_credential(&["--rights", "write"]);
    credentials_file(env, "push-credentials", &[&entry]);
    std::fs::write(&token_file, &token).unwrap();
    let netrc = env.path("push-netrc");
    std::fs::write(
        &netrc,
        format!("machine 127.0.0.1 login pusher password {token}\n"),
    )
    .unwrap();
    env.set_nix_config(Some(format!("netrc-file = {}", netrc.display())));
    (token, creds)
}

/// `nixcached serve --allow-push` of `store` with `env`'s write credential
/// ([`push_writer`]), signing with `sk`, plus `extra` flags.
pub fn serve_pushable(
    env: &NixEnv,
    store: &str,
    sk: &std::path::Path,
    extra: &[&str],
) -> super::Daemon {
    // Pushes need a write credential; reads stay public.
    let (_, creds) = push_writer(env);
    let mut args = vec![
        "serve",
        "--allow-push",
        "--credentials",
        &creds,
        "--secret-key-file",
        sk.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(store);
    super::Daemon::start(env, &args)
}
