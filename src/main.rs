//! The `nixcached` binary: sets up logging, parses the command line and hands over to the
//! library (`src/lib.rs`).

use clap::Parser;
use nixcached::{cli, run};

fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(nixcached::progress::LogWriter)
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
            eprintln!("nixcached: error: {}", nixcached::error_line(&e));
            std::process::ExitCode::from(nixcached::exit_code(&e))
        }
    }
}
