//! The connection actor: owns the one long-lived `nix-store --serve --write` session of an
//! ssh store and runs requests on it one at a time.
//!
//! The serve protocol is strictly request then answer on one pipe, so exchanges must not
//! interleave: each handler returns an [`AtomicResponse`], which keeps the actor from taking
//! the next message until the exchange is over. The session is opened on first use and again
//! after it drops (ssh died, host restarted): an exchange that breaks fails with the error and
//! leaves no session, and the next message logs in again. A session found dead before its
//! request was written (ssh exited while idle) is replaced and the request retried once, since
//! nothing reached the server.
//!
//! The actor runs on a thread and actix system of its own, started by [`SshConnection::spawn`]:
//! stores are opened before (and used outside) any actix system, and the ssh processes need a
//! runtime that lives exactly as long as the store.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::fut::{wrap_future, ActorFutureExt};
use actix::{Actor, Addr, AtomicResponse, Context, Handler, Message, System};
use futures::future::LocalBoxFuture;
use tempfile::TempPath;
use tokio::runtime::Handle;

use super::error::SshError;
use super::session::{Failure, Session};
use super::target::SshTarget;
use super::wire::PathInfo;
use crate::formats::{Compression, Hash};

/// Time limit of a metadata request (not of imports, which take as long as their NAR).
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Logs in if there is no live session: the health probe's question "does the host answer?".
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SshError>")]
pub struct Connect;

/// `QueryValidPaths`: the valid ones among these full store paths.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<String>, SshError>")]
pub struct QueryValidPaths(pub Vec<String>);

/// `QueryPathInfos`: metadata of the valid ones among these full store paths.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<PathInfo>, SshError>")]
pub struct QueryPathInfos(pub Vec<String>);

/// Adds a path to the remote store from a spooled (possibly compressed) NAR.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SshError>")]
pub struct AddToStore {
    /// The path's metadata, as the protocol carries it.
    pub info: PathInfo,
    /// The NAR hash `info` states, to check NARs the server cannot check itself.
    pub nar_hash: Hash,
    /// The spooled file.
    pub file: Arc<TempPath>,
    /// How the file is compressed.
    pub compression: Compression,
}

/// The actor owning the metadata session.
pub struct SshConnection {
    target: Arc<SshTarget>,
    rt: Handle,
    session: Option<Session>,
    /// Import with `ImportPaths` even when the server has `AddToStoreNar`.
    legacy_import: bool,
    /// Whether the last exchange left a session open, for the store's health probe, which
    /// must not queue behind a long request to find out.
    logged_in: Arc<AtomicBool>,
}

impl Actor for SshConnection {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // The last address is gone (the store was dropped). This actor is alone on the system
        // `spawn` made for it, so stopping that system ends the thread.
        self.session = None;
        System::current().stop();
    }
}

/// One attempt of an exchange on a session.
type Op<T> = Box<dyn for<'s> FnMut(&'s mut Session) -> LocalBoxFuture<'s, Result<T, Failure>>>;

impl SshConnection {
    /// Starts the actor for `target` on a thread of its own; returns its address and the
    /// runtime that thread drives, on which every ssh process of the store should live.
    /// It logs in at the first request, not now: a host that is down at start is a store
    /// that is down, not a daemon that cannot start. `logged_in` follows whether the last
    /// exchange left a session open.
    pub fn spawn(
        target: Arc<SshTarget>,
        legacy_import: bool,
        logged_in: Arc<AtomicBool>,
    ) -> io::Result<(Addr<SshConnection>, Handle)> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("ssh {}", target.host))
            .spawn(move || {
                let system = System::new();
                system.block_on(async move {
                    let rt = Handle::current();
                    let addr = SshConnection {
                        target,
                        rt: rt.clone(),
                        session: None,
                        legacy_import,
                        logged_in,
                    }
                    .start();
                    let _ = tx.send((addr, rt));
                });
                let _ = system.run();
            })?;
        rx.recv()
            .map_err(|_| io::Error::other("the ssh connection thread stopped while starting"))
    }

    /// Runs `op` on the session (opened if needed), with the retry and drop rules of this
    /// module, and keeps the actor busy until it is done. An `idempotent` op that breaks on a
    /// reused session is tried once more on a fresh one: the session may have died between
    /// the liveness check and the request (ssh killed, connection dropped while idle), and
    /// asking again cannot do harm.
    fn exchange<T: 'static>(
        &mut self,
        limit: Option<Duration>,
        idempotent: bool,
        mut op: Op<T>,
    ) -> AtomicResponse<Self, Result<T, SshError>> {
        let mut idle = self.session.take();
        let target = self.target.clone();
        let rt = self.rt.clone();
        let work = async move {
            if idle.as_mut().is_some_and(|s| !s.is_alive()) {
                idle = None;
            }
            let mut retried = false;
            loop {
                let reused = idle.is_some();
                let mut session = match idle.take() {
                    Some(s) => s,
                    None => match Session::open(&target, &rt, true).await {
                        Ok(s) => s,
                        Err(e) => return (None, Err(e)),
                    },
                };
                let result = match limit {
                    None => op(&mut session).await,
                    Some(limit) => tokio::time::timeout(limit, op(&mut session))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Failure::Broken(SshError::Timeout {
                                host: target.destination(),
                                secs: limit.as_secs(),
                            }))
                        }),
                };
                match result {
                    Ok(v) => return (Some(session), Ok(v)),
                    Err(Failure::NotSent(e)) => return (Some(session), Err(e)),
                    Err(Failure::Stale(e)) if !retried => {
                        tracing::debug!(
                            "ssh session to {} was gone ({e}); logging in again",
                            target.destination()
                        );
                        retried = true;
                    }
                    Err(Failure::Broken(e)) if idempotent && reused && !retried => {
                        tracing::debug!(
                            "ssh session to {} broke on a reused connection ({e}); asking again on a new one",
                            target.destination()
                        );
                        retried = true;
                    }
                    Err(f) => return (None, Err(f.into_error())),
                }
            }
        };
        AtomicResponse::new(Box::pin(wrap_future::<_, Self>(work).map(
            |(session, result), act, _ctx| {
                act.logged_in.store(session.is_some(), Ordering::Release);
                act.session = session;
                result
            },
        )))
    }
}

impl Handler<Connect> for SshConnection {
    type Result = AtomicResponse<Self, Result<(), SshError>>;

    fn handle(&mut self, _msg: Connect, _ctx: &mut Self::Context) -> Self::Result {
        self.exchange(None, true, Box::new(|_s| Box::pin(async { Ok(()) })))
    }
}

impl Handler<QueryValidPaths> for SshConnection {
    type Result = AtomicResponse<Self, Result<Vec<String>, SshError>>;

    fn handle(&mut self, msg: QueryValidPaths, _ctx: &mut Self::Context) -> Self::Result {
        let paths = Arc::new(msg.0);
        self.exchange(
            Some(QUERY_TIMEOUT),
            true,
            Box::new(move |s| {
                let paths = paths.clone();
                Box::pin(async move { s.query_valid_paths(&paths).await })
            }),
        )
    }
}

impl Handler<QueryPathInfos> for SshConnection {
    type Result = AtomicResponse<Self, Result<Vec<PathInfo>, SshError>>;

    fn handle(&mut self, msg: QueryPathInfos, _ctx: &mut Self::Context) -> Self::Result {
        let paths = Arc::new(msg.0);
        self.exchange(
            Some(QUERY_TIMEOUT),
            true,
            Box::new(move |s| {
                let paths = paths.clone();
                Box::pin(async move { s.query_path_infos(&paths).await })
            }),
        )
    }
}

impl Handler<AddToStore> for SshConnection {
    type Result = AtomicResponse<Self, Result<(), SshError>>;

    fn handle(&mut self, msg: AddToStore, _ctx: &mut Self::Context) -> Self::Result {
        let msg = Arc::new(msg);
        let legacy = self.legacy_import;
        self.exchange(
            None,
            false,
            Box::new(move |s| {
                let msg = msg.clone();
                Box::pin(async move {
                    // Opened per attempt: a retry must start from the NAR's first byte.
                    let file = tokio::fs::File::open(&**msg.file).await.map_err(|e| {
                        Failure::NotSent(SshError::Local {
                            context: format!("opening the spooled NAR of {}", msg.info.path),
                            source: e,
                        })
                    })?;
                    let mut nar = msg
                        .compression
                        .decoder(tokio::io::BufReader::with_capacity(256 * 1024, file));
                    s.add_to_store(&msg.info, &msg.nar_hash, &mut nar, legacy)
                        .await
                })
            }),
        )
    }
}
