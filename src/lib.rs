//! The `nixcached` command line as a library: clap arguments, the config file, and the
//! wiring of each subcommand onto the actors crate. `main.rs` only parses and calls [`run`].
//!
//! A library target so the config parser can be fuzzed and tested without running the binary.

pub mod cli;
pub mod config;
pub mod credential;
pub mod fsck;
pub mod gc;
pub mod progress;
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
            anyhow::bail!(
                "give a subcommand (serve, upload, send, fsck, gc, pin, credential) or --config FILE; see --help"
            )
        }
        (Some(cli::Command::Serve(args)), None) => serve::run(*args),
        (Some(cli::Command::Upload(args)), None) => upload::run(args),
        (Some(cli::Command::Send(args)), None) => send::run(args),
        (Some(cli::Command::Fsck(args)), None) => fsck::run(args),
        (Some(cli::Command::Gc(args)), None) => gc::run(args),
        (Some(cli::Command::Pin(cmd)), None) => gc::pin(cmd),
        (Some(cli::Command::Credential(cmd)), None) => credential::run(cmd),
    }
}

/// An error as one line for the user: the message and each cause in turn, leaving out a
/// cause whose text the line already holds (many errors print their source in their own
/// message, and the plain chain would say it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// The exit code for an error: what [`nixcached_actors::send::SendError::exit_code`] says
/// for `send`'s errors, what [`fsck::FsckFailure::exit_code`] says for `fsck`'s, 1 for
/// everything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(f) = e.downcast_ref::<fsck::FsckFailure>() {
        return f.exit_code();
    }
    e.downcast_ref::<nixcached_actors::send::SendError>()
        .map_or(1, |s| s.exit_code())
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn an_error_line_names_each_cause_once() {
        let io = std::io::Error::other("No space left on device");
        let said_twice = nixcached_actors::send::SendError::Io {
            context: "writing /spool/x".into(),
            source: io,
        };
        let e = anyhow::Error::new(said_twice).context("sending");
        assert_eq!(
            error_line(&e),
            "sending: writing /spool/x: No space left on device"
        );
        let plain = anyhow::anyhow!("outer").context("top");
        assert_eq!(error_line(&plain), "top: outer");
    }
}
