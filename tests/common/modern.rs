//! The two real Nix clients the tests run: Debian 12's Nix 2.8 on the host, and Debian 13's
//! Nix 2.26 in the trixie root that scripts/test debootstraps (`NIXCACHED_TEST_NIX226_ROOT`).
//!
//! Nix 2.26 runs chrooted in that root, one private mount namespace per command, so no mount
//! outlives the command. The root shares the host's network (loopback servers are reachable) and
//! sees the test's own folder at the same path, so stores, caches, keys and FIFOs of a test
//! have one name on both sides.

use std::path::Path;
use std::process::Command;

/// Which real Nix a [`super::NixEnv`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// The host's Nix (Debian 12 `nix-bin`, 2.8): never asks for zstd, legacy JSON.
    Nix28,
    /// Debian 13's `nix-bin` (2.26) in the trixie root: asks for `Content-Encoding: zstd`.
    Nix226,
}

/// Both clients, for tests that run once per client.
pub const BOTH: [Client; 2] = [Client::Nix28, Client::Nix226];

/// Where, inside a test's folder, the host's `nixcached` binary appears to Nix 2.26 (a bind
/// mount made per command over an empty file).
pub const BIN_IN_ROOT: &str = ".nixcached-bin";

/// The folder, inside a test's folder, mounted over the root's `/nix`: whatever Nix 2.26 keeps
/// in its default store and state (it opens them even for commands given `--store`) stays with
/// the test, never in the cached root nor shared between tests.
pub const NIX_IN_ROOT: &str = ".nix226";

/// Runs `$@` chrooted in the trixie root `$1` with the test folder `$2` and the binary `$3`
/// visible (at [`BIN_IN_ROOT`]; [`NIX_IN_ROOT`] over `/nix`: the script names both). `pivot_root` rather than a bare `chroot`: Nix 2.26 builds in a diverted store only
/// in its sandbox, which needs a user namespace, and the kernel refuses those to a chrooted
/// process whose root is not its mount namespace's root.
const ENTER: &str = r#"set -eu
root=$1 dir=$2 bin=$3
shift 3
if [ ! -d "$root/.host" ] || [ ! -d "$root/nix" ] || [ ! -x "$root/usr/bin/nix" ]; then
  echo "$root is not a complete trixie root with Nix 2.26: run scripts/test, which rebuilds it" >&2
  exit 125
fi
mount --bind "$root" "$root"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t tmpfs tmpfs "$root/tmp"
mkdir -p "$root$dir"
mount --bind "$dir" "$root$dir"
mount --bind "$bin" "$root$dir/.nixcached-bin"
mount --bind "$dir/.nix226" "$root/nix"
cd "$root"
pivot_root . .host
exec chroot . /bin/sh -c 'umount -l /.host && exec "$@"' sh \
  /usr/bin/env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
"#;

/// The trixie root, or a failure that says how to get one: a test of the modern client never
/// skips silently.
pub fn nix226_root() -> String {
    let root = std::env::var("NIXCACHED_TEST_NIX226_ROOT").unwrap_or_default();
    assert!(
        !root.is_empty(),
        "NIXCACHED_TEST_NIX226_ROOT is not set: this test runs the modern Nix client (2.26) in a \
         Debian trixie root that scripts/test builds and exports; run it under scripts/test (or \
         `scripts/test --peers-only > peers.env` and `. peers.env`)"
    );
    assert!(
        Path::new(&root).join("usr/bin/nix").exists(),
        "NIXCACHED_TEST_NIX226_ROOT={root} has no usr/bin/nix: run scripts/test, which rebuilds it"
    );
    root
}

/// A command that runs the Nix program `program` of `client`, for a test whose folder is `dir`.
pub fn nix_command(client: Client, dir: &Path, program: &str) -> Command {
    match client {
        Client::Nix28 => Command::new(program),
        Client::Nix226 => {
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "sh", "-c", ENTER, "sh"])
                .arg(nix226_root())
                .arg(dir)
                .arg(env!("CARGO_BIN_EXE_nixcached"))
                .arg(program);
            c
        }
    }
}
