//! The `nixcached` binary: parses the command line and hands over to the actors crate.

mod cli;
mod config;
mod send;
mod serve;
mod upload;

use clap::Parser;

fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.debug);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line a user can act on, with the chain of causes; no backtrace.
            eprintln!("nixcached: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<()> {
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
