//! The signals that stop `serve` and `upload`: SIGTERM, SIGINT and SIGHUP.
//!
//! Each program decides what a signal means (`serve` stops on any of them after its grace
//! period, except SIGHUP when it serves TLS: that reloads the certificate and key; `upload`
//! drains on SIGHUP and stops promptly on the others), so this only says which one arrived.

use std::fmt;
use std::io;

use tokio::signal::unix::{signal, SignalKind};

/// A stop signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: what service managers send to stop a program.
    Term,
    /// SIGINT: Ctrl-C.
    Int,
    /// SIGHUP: `upload` reads it as "finish what was accepted, then exit"; `serve` with TLS
    /// as "reload the certificate and key".
    Hup,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
        })
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment this is made: install it before
/// announcing readiness, so an early signal is a clean stop rather than the default kill.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers (inside a Tokio runtime).
    pub fn install() -> io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves with the first signal received.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Term,
            _ = self.int.recv() => Signal::Int,
            _ = self.hup.recv() => Signal::Hup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_print_their_unix_names() {
        // Logs and `upload`'s outcome reason carry these names; scripts match on them.
        assert_eq!(Signal::Term.to_string(), "SIGTERM");
        assert_eq!(Signal::Int.to_string(), "SIGINT");
        assert_eq!(Signal::Hup.to_string(), "SIGHUP");
    }

    #[tokio::test]
    async fn recv_names_the_signal_that_arrived() {
        let mut signals = StopSignals::install().unwrap();
        // Raised only after install(): from then on the handler takes the place of the
        // default action, which would end the whole test process.
        // SAFETY: raise(3) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        assert_eq!(signals.recv().await, Signal::Hup);
    }
}
