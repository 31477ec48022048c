//! Command-line interface, compatible with the Go nixcached's flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Nix cache daemon: serve a store over HTTP, upload build results asynchronously.
#[derive(Debug, Parser)]
#[command(name = "nixcached", version, about, propagate_version = true)]
pub struct Cli {
    /// Show debug logs (RUST_LOG overrides).
    #[arg(long, global = true)]
    pub debug: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The three subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an HTTP binary cache server for a store.
    Serve(ServeArgs),
    /// Upload store paths read from a file or pipe to a binary cache.
    Upload(UploadArgs),
    /// Queue store paths for upload (what a Nix post-build hook runs).
    Send(SendArgs),
}

/// `nixcached serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Interface to listen on.
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// TCP port.
    #[arg(short, long, default_value_t = 38380)]
    pub port: u16,
    /// Use systemd socket activation.
    #[arg(long)]
    pub systemd: bool,
    /// Folder replacing the embedded web UI resources.
    #[arg(long)]
    pub client: Option<PathBuf>,
    /// Store to serve: /nix/store, local?root=DIR, file:///DIR, s3://BUCKET, gs://BUCKET or
    /// ssh://HOST. Default: the local Nix store when there is one, else a cache folder.
    pub store: Option<String>,
}

/// `nixcached upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    /// File or FIFO to read store paths from (default: standard input).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Keep a FIFO open for new senders instead of stopping at end of input.
    #[arg(short = 'k', long)]
    pub keep_alive: bool,
    /// Stop after the finish marker that `send --finish` writes.
    #[arg(long)]
    pub allow_finish: bool,
    /// Upload objects even when the cache has them.
    #[arg(short, long)]
    pub force: bool,
    /// NAR compression: zstd, xz, bzip2, gzip, br or none.
    #[arg(long, default_value = "zstd")]
    pub compression: String,
    /// Also write a .ls listing of each NAR.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub write_nar_listing: bool,
    /// Objects uploaded concurrently.
    #[arg(short, long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: u32,
    /// Destination binary cache URL.
    pub dest: String,
}

/// `nixcached send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The pipe `upload` reads from.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Give up after this long (for example 30s or 2m).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Also tell `upload --allow-finish` to stop after these paths.
    #[arg(long)]
    pub finish: bool,
    /// Store paths to queue.
    pub paths: Vec<String>,
}
