//! What goes wrong with an ssh store, in words a user can act on, and how ssh's exit status
//! and last words on stderr map onto them.

use std::io;
use std::process::ExitStatus;

use thiserror::Error;

use crate::store::StoreError;

/// Why talking to the remote `nix-store` failed.
#[derive(Debug, Error)]
pub enum SshError {
    /// The host could not be reached at all.
    #[error("cannot reach {host} over ssh: {detail}")]
    Unreachable {
        /// `[user@]host`.
        host: String,
        /// ssh's words.
        detail: String,
    },
    /// sshd refused every key ssh offered.
    #[error("{host} refused the ssh login ({detail}); give a key with ?ssh-key=, load it into ssh-agent, or pass ssh options in NIX_SSHOPTS")]
    AuthRefused {
        /// `[user@]host`.
        host: String,
        /// ssh's words.
        detail: String,
    },
    /// ssh does not trust the host key.
    #[error("the host key of {host} is not trusted ({detail}); add it to ~/.ssh/known_hosts, for example by running `ssh {host}` once")]
    HostKey {
        /// `[user@]host`.
        host: String,
        /// ssh's words.
        detail: String,
    },
    /// The login worked but the remote shell has no `nix-store`.
    #[error("`{program}` was not found on {host} (non-interactive ssh sessions must find it on PATH); install Nix there or give its path with ?remote-program=")]
    NixNotFound {
        /// `[user@]host`.
        host: String,
        /// The program that was run.
        program: String,
    },
    /// The local `ssh` program could not be started.
    #[error("cannot run ssh ({0}); install the OpenSSH client")]
    SshMissing(io::Error),
    /// The remote `nix-store` (or ssh) stopped with an error message.
    #[error("{host}: {detail}")]
    Remote {
        /// `[user@]host`.
        host: String,
        /// The last lines it printed, or its exit status.
        detail: String,
    },
    /// The other side does not speak the serve protocol as expected.
    #[error("{host}: {detail}")]
    Protocol {
        /// `[user@]host`.
        host: String,
        /// What was wrong.
        detail: String,
    },
    /// No answer in time; the connection was dropped.
    #[error("{host} did not answer within {secs} s; the ssh connection was dropped")]
    Timeout {
        /// `[user@]host`.
        host: String,
        /// The time limit.
        secs: u64,
    },
    /// A NAR handed to the store for import does not match its narinfo.
    #[error("{0}")]
    BadNar(String),
    /// A local file (a spooled NAR) could not be read.
    #[error("{context}: {source}")]
    Local {
        /// What was being done.
        context: String,
        /// The cause.
        source: io::Error,
    },
}

impl SshError {
    /// Turns this error into a store error, saying what was being done.
    pub fn into_store_error(self, context: impl Into<String>) -> StoreError {
        match self {
            SshError::BadNar(msg) => StoreError::Corrupt(msg),
            other => StoreError::backend(context, other),
        }
    }
}

/// The last meaningful lines of ssh's stderr, bounded, for messages.
fn last_words(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("; ");
    let len = tail.chars().count();
    match tail.char_indices().nth(len.saturating_sub(600)) {
        Some((i, _)) if i > 0 => format!("…{}", &tail[i..]),
        _ => tail,
    }
}

/// Classifies a failed ssh process from its exit status and stderr.
///
/// ssh exits 255 for its own failures; anything else is the remote command's status, 127
/// being the shell's "command not found".
pub fn classify(
    host: &str,
    program: &str,
    status: Option<ExitStatus>,
    stderr: &str,
    cause: Option<&io::Error>,
) -> SshError {
    let detail = last_words(stderr);
    let host = host.to_owned();
    let has = |needle: &str| stderr.contains(needle);
    let code = status.and_then(|s| s.code());
    if code == Some(255) || code.is_none() {
        if has("Permission denied (") || has("Too many authentication failures") {
            return SshError::AuthRefused { host, detail };
        }
        if has("Host key verification failed") || has("HOST IDENTIFICATION HAS CHANGED") {
            return SshError::HostKey { host, detail };
        }
        if [
            "Could not resolve hostname",
            "Connection refused",
            "Connection timed out",
            "No route to host",
            "Network is unreachable",
            "Connection closed by",
            "Connection reset by",
            "kex_exchange_identification",
        ]
        .iter()
        .any(|n| has(n))
        {
            return SshError::Unreachable { host, detail };
        }
    }
    if code == Some(127) || (has(program) && has("not found")) {
        return SshError::NixNotFound {
            host,
            program: program.to_owned(),
        };
    }
    let detail = if !detail.is_empty() {
        detail
    } else {
        match (status, cause) {
            (Some(s), _) if !s.success() => format!("ssh or the remote nix-store stopped ({s})"),
            (_, Some(e)) => format!("the connection broke: {e}"),
            _ => "the connection closed unexpectedly".to_owned(),
        }
    };
    SshError::Remote { host, detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exit(code: i32) -> Option<ExitStatus> {
        Some(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn ssh_failures_become_user_terms() {
        let c = |code, err: &str| classify("u@h", "nix-store", exit(code), err, None);
        assert!(matches!(
            c(255, "ssh: connect to host h port 1: Connection refused\n"),
            SshError::Unreachable { .. }
        ));
        assert!(matches!(
            c(
                255,
                "ssh: Could not resolve hostname h: Name or service not known\n"
            ),
            SshError::Unreachable { .. }
        ));
        assert!(matches!(
            c(255, "Warning: Permanently added 'h' (ED25519) to the list of known hosts.\nu@h: Permission denied (publickey).\n"),
            SshError::AuthRefused { .. }
        ));
        assert!(matches!(
            c(255, "Host key verification failed.\n"),
            SshError::HostKey { .. }
        ));
        assert!(matches!(
            c(127, "bash: line 1: nix-store: command not found\n"),
            SshError::NixNotFound { .. }
        ));
        let e = c(1, "error: path '/nix/store/x' is not valid\n");
        assert_eq!(
            e.to_string(),
            "u@h: error: path '/nix/store/x' is not valid"
        );
        let e = c(1, "");
        assert!(e.to_string().contains("exit status: 1"), "{e}");
        let msg = c(255, "u@h: Permission denied (publickey).").to_string();
        assert!(msg.contains("?ssh-key="), "{msg}");
        assert!(!msg.contains("Warning"), "{msg}");
    }

    #[test]
    fn long_stderr_is_cut() {
        let long = "x".repeat(5000);
        assert!(last_words(&long).chars().count() <= 601);
    }
}
