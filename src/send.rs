//! `nixcached send`: queue paths for upload (what a Nix post-build hook runs).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::cli::SendArgs;

/// Runs `send`.
pub fn run(args: SendArgs) -> anyhow::Result<()> {
    // Taken before sending, so a path settled from this send on is never missed.
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let deadline = args.timeout.map(|t| (Instant::now() + t, t));
    nixcached_actors::send::send(&args.output, &args.paths, args.finish, args.timeout)?;
    if args.wait {
        nixcached_actors::send::wait_uploaded(&args.output, &args.paths, since, deadline)?;
    }
    Ok(())
}
