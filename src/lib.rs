//! The `nixcached` command line as a library: clap arguments, the config file, and the
//! wiring of each subcommand onto the actors crate. `main.rs` only parses and calls [`run`].
//!
//! A library target so the config parser can be fuzzed and tested without running the binary.

pub mod cli;
pub mod config;
pub mod send;
pub mod serve;
pub mod upload;

/// Runs what the command line asks for.
pub fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match (cli.command, cli.config) {
        (Some(_), Some(_)) => {
            anyhow::bail!("--config runs what the file describes; give it without a subcommand")
        }
        (None, Some(file)) => config::run(config::Config::load(&file)?),
        (None, None) => {
            anyhow::bail!("give a subcommand (serve, upload, send) or --config FILE; see --help")
        }
        (Some(cli::Command::Serve(args)), None) => serve::run(args),
        (Some(cli::Command::Upload(args)), None) => upload::run(args),
        (Some(cli::Command::Send(args)), None) => send::run(args),
    }
}
