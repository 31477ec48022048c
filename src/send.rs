//! `nixcached send`: queue paths for upload (what a Nix post-build hook runs).

use crate::cli::SendArgs;

/// Runs `send`.
pub fn run(args: SendArgs) -> anyhow::Result<()> {
    nixcached_actors::send::send(&args.output, &args.paths, args.finish, args.timeout)?;
    Ok(())
}
