//! Content-addressed derivations (Nix's experimental `ca-derivations`), whose outputs a
//! client finds through their realisations.

use std::path::Path;

use super::modern::Client;
use super::NixEnv;

/// A content-addressed derivation built by the real Nix (experimental `ca-derivations`):
/// returns (its .drv, its output, the realisation id, the expression file).
pub fn build_ca(env: &NixEnv) -> (String, String, String, std::path::PathBuf) {
    let bb = env.path("cabb/bin");
    std::fs::create_dir_all(&bb).unwrap();
    std::fs::copy("/bin/busybox", bb.join("busybox")).unwrap();
    let bb = env.add(&env.path("cabb"));
    let file = env.path("ca.nix");
    std::fs::write(
        &file,
        format!(
            r#"let bb = builtins.storePath "{bb}"; in builtins.derivation {{
  name = "ca-thing"; system = builtins.currentSystem; builder = "${{bb}}/bin/busybox";
  args = [ "sh" "-c" "echo building ca-thing; mkdir -p $out; echo hi > $out/x" ];
  __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }}"#
        ),
    )
    .unwrap();
    let store = env.store_arg();
    let f = file.to_str().unwrap();
    let drv = env
        .run("nix-instantiate", &["--store", &store, f])
        .trim()
        .to_owned();
    let out = env
        .run("nix-build", &["--store", &store, f, "--no-out-link"])
        .trim()
        .to_owned();
    let info = env.run("nix", &["realisation", "info", "--store", &store, &drv]);
    let id = info.split_whitespace().next().unwrap().to_owned();
    assert!(id.ends_with("!out"), "{info}");
    (drv, out, id, file)
}

/// Realises `drv` into a fresh store with `url` as the only substituter and no local builds
/// allowed: it succeeds only if the output is found through its realisation.
pub fn substitute_ca(
    client: Client,
    src: &NixEnv,
    url: &str,
    pk: &str,
    drv: &str,
    out: &str,
    tag: &str,
) {
    let fresh = NixEnv::with_client(client);
    fresh.set_nix_config(Some(CA.into()));
    let store = fresh.path(&format!("fresh-{tag}"));
    let store = store.to_str().unwrap();
    // The derivation and its inputs, not its output.
    src.run(
        "nix",
        &[
            "copy",
            "--derivation",
            "--no-check-sigs",
            "--from",
            &src.store_arg(),
            "--to",
            store,
            drv,
        ],
    );
    let out_path = fresh.run(
        "nix-store",
        &[
            "--store",
            store,
            "--realise",
            drv,
            "--max-jobs",
            "0",
            "--option",
            "substituters",
            url,
            "--option",
            "trusted-public-keys",
            pk,
        ],
    );
    assert!(
        out_path.contains(out),
        "{client:?} {tag}: realised {out_path:?}"
    );
    assert!(
        Path::new(store)
            .join(out.trim_start_matches('/'))
            .join("x")
            .exists(),
        "{tag}: no output"
    );
}

pub const CA: &str = "experimental-features = nix-command ca-derivations";
