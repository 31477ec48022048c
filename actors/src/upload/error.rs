//! What can stop an upload pipeline, in terms a user can act on.
//!
//! One failed object is not here: that is an [`UploadFailure`](super::uploader::UploadFailure),
//! retried or recorded in the journal while the pipeline goes on. These errors end a run (or
//! the reading of its input).

use std::path::PathBuf;

use super::journal::JournalError;
use crate::store::StoreError;

/// Why an upload pipeline (or its input) stopped.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The destination refused to be prepared for a reason retrying cannot fix.
    #[error("preparing {dest}: {source} (check the destination URL and its credentials)")]
    Prepare {
        /// The destination, as the user named it.
        dest: String,
        /// The store's answer.
        source: StoreError,
    },
    /// The journal (SQLite) or the spool failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// An actor of the pipeline is gone: the process is shutting down or an actor panicked.
    #[error(
        "the upload scheduler is gone ({0}); accepted paths stay in the journal for the next start"
    )]
    Scheduler(#[from] actix::MailboxError),
    /// A blocking journal task did not finish.
    #[error("a journal task failed ({0}); accepted paths stay in the journal for the next start")]
    Task(#[from] tokio::task::JoinError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The input (FIFO, file or standard input) could not be opened or read.
    #[error("reading {}: {source}", .path.as_ref().map_or("standard input".into(), |p| p.display().to_string()))]
    Input {
        /// The input file or FIFO; `None` for standard input.
        path: Option<PathBuf>,
        /// The cause.
        source: std::io::Error,
    },
}
