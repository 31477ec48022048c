//! The upload scheduler actor: durable acceptance, closures, ordering, retries and draining.
//!
//! - `Enqueue` commits all its paths to the journal first (so nothing read is ever lost),
//!   then takes them in pieces of at most [`PIECE`] (and at most the queue bound), each piece
//!   waiting for room in the queue; it replies when the last piece is in. The reader awaits
//!   each reply, so a full queue stops the reader, the pipe fills and `send` blocks. That is
//!   the backpressure, and it needs no other mechanism. A batch of any size gets through: no
//!   piece ever waits for more room than the queue has.
//! - Each accepted path brings its closure (from the local Nix database). An object is
//!   dispatched only when all its references are in the destination, so a narinfo never
//!   appears before the narinfos of its references: the destination is a consistent cache
//!   at every instant.
//! - Transient failures retry with exponential backoff; permanent ones fail the object and
//!   everything that refers to it (whose narinfos could never be valid), and nothing else.
//! - `Drain` is answered when everything accepted before it is finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, ResponseActFuture,
    WrapFuture,
};
use tokio::sync::{oneshot, Semaphore};

use super::error::UploadError;
use super::journal::{Journal, State};
use super::stats::{Snapshot, UploadStats};
use super::uploader::{Upload, UploadFailure, Uploaded, Uploader};
use crate::formats::{Digest, StorePath};
use crate::store::local::LocalStore;
use crate::store::StoreError;

/// Accept store paths (absolute) for upload, any number of them.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), UploadError>")]
pub struct Enqueue(pub Vec<String>);

/// Most paths that wait for room in the queue together: small enough that a piece never
/// waits for much of the queue to empty, large enough that a long spool is not one
/// round trip per path.
pub const PIECE: usize = 64;

/// Take journaled paths into the queue once it has room for all of them; sent by the
/// scheduler to itself, one piece of an [`Enqueue`] at a time.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), UploadError>")]
struct Admit(Vec<String>);

/// Answer when everything accepted so far is finished.
#[derive(Debug, Message)]
#[rtype(result = "Summary")]
pub struct Drain;

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Objects written.
    pub uploaded: u64,
    /// Objects the destination already had.
    pub present: u64,
    /// Objects given up on.
    pub failed: u64,
    /// Compressed bytes written.
    pub bytes: u64,
    /// Uploads tried again after a passing failure.
    pub retries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ObjState {
    /// Some reference is not in the destination yet.
    Waiting,
    /// In the ready queue (or backing off before re-entering it).
    Ready,
    /// With an uploader.
    Running,
    /// In the destination.
    Done,
    /// Given up on.
    Failed(String),
}

#[derive(Debug)]
struct Obj {
    path: StorePath,
    /// Digests of references other than itself.
    refs: Vec<Digest>,
    referrers: HashSet<Digest>,
    roots: HashSet<String>,
    state: ObjState,
    attempts: u32,
}

#[derive(Debug, Default)]
struct Root {
    remaining: HashSet<Digest>,
    failure: Option<String>,
}

/// Scheduling knobs.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// Most accepted-but-unfinished paths before `Enqueue` waits.
    pub queue_bound: usize,
    /// First retry delay; doubles per attempt.
    pub backoff_start: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How often progress is logged (zero: never).
    pub progress_every: Duration,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            queue_bound: 10_000,
            backoff_start: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            progress_every: Duration::from_secs(10),
        }
    }
}

/// The scheduler.
pub struct Scheduler {
    source: Arc<LocalStore>,
    journal: Arc<Journal>,
    uploaders: Vec<Addr<Uploader>>,
    idle: Vec<usize>,
    objects: HashMap<Digest, Obj>,
    roots: HashMap<String, Root>,
    ready: VecDeque<Digest>,
    permits: Arc<Semaphore>,
    settings: SchedulerSettings,
    drain_waiters: Vec<oneshot::Sender<Summary>>,
    /// Enqueues accepted but not yet registered (journaling, closure queries): a drain
    /// must wait for them too.
    enqueues_in_progress: usize,
    summary: Summary,
    last_progress: (Instant, u64),
    /// Where the totals are published for progress displays and `/metrics`.
    stats: Arc<UploadStats>,
    /// The object each uploader slot is on, for the progress display.
    running: Vec<Option<String>>,
}

impl Scheduler {
    /// A scheduler feeding `uploaders` from `source`'s closures, journaling into `journal`.
    pub fn new(
        source: Arc<LocalStore>,
        journal: Arc<Journal>,
        uploaders: Vec<Addr<Uploader>>,
        settings: SchedulerSettings,
        stats: Arc<UploadStats>,
    ) -> Scheduler {
        let idle = (0..uploaders.len()).collect();
        let running = vec![None; uploaders.len()];
        Scheduler {
            source,
            journal,
            uploaders,
            idle,
            objects: HashMap::new(),
            roots: HashMap::new(),
            ready: VecDeque::new(),
            permits: Arc::new(Semaphore::new(settings.queue_bound.max(1))),
            settings,
            drain_waiters: Vec::new(),
            enqueues_in_progress: 0,
            summary: Summary::default(),
            last_progress: (Instant::now(), 0),
            stats,
            running,
        }
    }

    /// Publishes the totals and what is uploading now.
    fn publish(&self) {
        self.stats.store(Snapshot {
            queued: self.roots.len() as u64,
            uploading: (self.uploaders.len() - self.idle.len()) as u64,
            uploaded: self.summary.uploaded,
            present: self.summary.present,
            failed: self.summary.failed,
            bytes: self.summary.bytes,
            retries: self.summary.retries,
            current: self.running.iter().flatten().cloned().collect(),
        });
    }

    /// Registers an accepted root with its closure.
    fn add_root(
        &mut self,
        root: String,
        closure: Result<Vec<(StorePath, Vec<StorePath>)>, StoreError>,
    ) {
        if self.roots.contains_key(&root) {
            // Already on its way: the second acceptance needs no queue slot.
            self.permits.add_permits(1);
            return;
        }
        let closure = match closure {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot upload {root}: {e}");
                self.summary.failed += 1;
                self.record(&root, State::Failed, Some(&e.to_string()));
                self.permits.add_permits(1);
                return;
            }
        };
        let mut entry = Root::default();
        for (path, refs) in &closure {
            let d = *path.digest();
            let obj = self.objects.entry(d).or_insert_with(|| Obj {
                path: path.clone(),
                refs: refs
                    .iter()
                    .map(|r| *r.digest())
                    .filter(|r| r != path.digest())
                    .collect(),
                referrers: HashSet::new(),
                roots: HashSet::new(),
                state: ObjState::Waiting,
                attempts: 0,
            });
            if let ObjState::Failed(_) = obj.state {
                // Sent again: give it another chance.
                obj.state = ObjState::Waiting;
                obj.attempts = 0;
            }
            if obj.state != ObjState::Done {
                obj.roots.insert(root.clone());
                entry.remaining.insert(d);
            }
        }
        for (path, refs) in &closure {
            for r in refs.iter().filter(|r| *r != path) {
                if let Some(o) = self.objects.get_mut(r.digest()) {
                    o.referrers.insert(*path.digest());
                }
            }
        }
        let empty = entry.remaining.is_empty();
        let members: Vec<Digest> = entry.remaining.iter().copied().collect();
        self.roots.insert(root.clone(), entry);
        for d in members {
            self.promote(&d);
        }
        if empty {
            self.finish_root(&root);
        }
    }

    /// Moves a waiting object to the ready queue when all its references are done.
    fn promote(&mut self, digest: &Digest) {
        let Some(obj) = self.objects.get(digest) else {
            return;
        };
        if obj.state != ObjState::Waiting {
            return;
        }
        let mut blocked_by_failure = None;
        let all_done = obj
            .refs
            .iter()
            .all(|r| match self.objects.get(r).map(|o| &o.state) {
                Some(ObjState::Done) => true,
                Some(ObjState::Failed(m)) => {
                    blocked_by_failure = Some(format!("its reference {r} failed: {m}"));
                    false
                }
                _ => false,
            });
        if let Some(why) = blocked_by_failure {
            self.fail(digest, why);
        } else if all_done {
            self.objects.get_mut(digest).expect("present").state = ObjState::Ready;
            self.ready.push_back(*digest);
        }
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while let (Some(&slot), Some(digest)) = (self.idle.last(), self.ready.front().cloned()) {
            self.ready.pop_front();
            let Some(obj) = self.objects.get_mut(&digest) else {
                continue;
            };
            if obj.state != ObjState::Ready {
                continue;
            }
            self.idle.pop();
            obj.state = ObjState::Running;
            self.running[slot] = Some(obj.path.to_string());
            let fut = self.uploaders[slot].send(Upload(obj.path.clone()));
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                act.idle.push(slot);
                act.running[slot] = None;
                let res = res.unwrap_or_else(|e| {
                    Err(UploadFailure {
                        permanent: false,
                        message: format!("uploader unavailable: {e}"),
                    })
                });
                act.finished(&digest, res, ctx);
                act.dispatch(ctx);
            }));
        }
        // Every event that changes the totals ends here (admissions, finished uploads,
        // retries coming due), so this is the one place they are published.
        self.publish();
    }

    fn finished(
        &mut self,
        digest: &Digest,
        res: Result<Uploaded, UploadFailure>,
        ctx: &mut Context<Self>,
    ) {
        match res {
            Ok(up) => {
                match up {
                    Uploaded::Published { file_size } => {
                        self.summary.uploaded += 1;
                        self.summary.bytes += file_size;
                    }
                    Uploaded::Present { .. } => self.summary.present += 1,
                }
                let Some(obj) = self.objects.get_mut(digest) else {
                    return;
                };
                obj.state = ObjState::Done;
                let referrers: Vec<Digest> = obj.referrers.iter().copied().collect();
                let roots: Vec<String> = obj.roots.drain().collect();
                for r in referrers {
                    self.promote(&r);
                }
                for root in roots {
                    self.member_settled(&root, digest);
                }
            }
            Err(f) if f.permanent => {
                tracing::error!("failed permanently: {}", f.message);
                self.fail(digest, f.message);
            }
            Err(f) => {
                let Some(obj) = self.objects.get_mut(digest) else {
                    return;
                };
                obj.attempts += 1;
                self.summary.retries += 1;
                for root in &obj.roots {
                    if let Err(e) = self.journal.note_retry(root, &f.message) {
                        tracing::error!("{e}");
                    }
                }
                let delay = self
                    .settings
                    .backoff_start
                    .saturating_mul(1 << obj.attempts.min(16).saturating_sub(1))
                    .min(self.settings.backoff_max);
                tracing::warn!(
                    "{} (attempt {}); retrying in {delay:?}",
                    f.message,
                    obj.attempts
                );
                obj.state = ObjState::Ready;
                let d = *digest;
                ctx.run_later(delay, move |act, ctx| {
                    act.ready.push_back(d);
                    act.dispatch(ctx);
                });
            }
        }
    }

    /// Fails an object and, transitively, everything waiting on it.
    fn fail(&mut self, digest: &Digest, why: String) {
        let mut stack = vec![(*digest, why)];
        while let Some((d, why)) = stack.pop() {
            let Some(obj) = self.objects.get_mut(&d) else {
                continue;
            };
            if matches!(obj.state, ObjState::Done | ObjState::Failed(_)) {
                continue;
            }
            obj.state = ObjState::Failed(why.clone());
            self.summary.failed += 1;
            let roots: Vec<String> = obj.roots.drain().collect();
            for r in obj.referrers.iter() {
                stack.push((*r, format!("its reference {} failed", obj.path)));
            }
            for root in roots {
                if let Some(r) = self.roots.get_mut(&root) {
                    r.failure.get_or_insert(why.clone());
                }
                self.member_settled(&root, &d);
            }
        }
    }

    fn member_settled(&mut self, root: &str, digest: &Digest) {
        let Some(r) = self.roots.get_mut(root) else {
            return;
        };
        r.remaining.remove(digest);
        if r.remaining.is_empty() {
            self.finish_root(root);
        }
    }

    fn finish_root(&mut self, root: &str) {
        let Some(r) = self.roots.remove(root) else {
            return;
        };
        match &r.failure {
            None => self.record(root, State::Done, None),
            Some(why) => self.record(root, State::Failed, Some(why)),
        }
        self.permits.add_permits(1);
        self.answer_drains();
    }

    fn idle_now(&self) -> bool {
        self.roots.is_empty() && self.enqueues_in_progress == 0
    }

    fn answer_drains(&mut self) {
        if self.idle_now() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(self.summary.clone());
            }
        }
    }

    fn record(&self, root: &str, state: State, error: Option<&str>) {
        if let Err(e) = self.journal.set(root, state, error) {
            tracing::error!("{e}");
        }
    }

    fn progress(&mut self) {
        let (since, bytes_then) = self.last_progress;
        let secs = since.elapsed().as_secs_f64().max(0.001);
        let rate = (self.summary.bytes - bytes_then) as f64 / secs / (1024.0 * 1024.0);
        let in_flight = self.uploaders.len() - self.idle.len();
        if !self.roots.is_empty() || in_flight > 0 {
            tracing::info!(
                "progress: {} paths queued, {} objects in flight, {} uploaded, {} already present, {} failed, {:.1} MiB/s",
                self.roots.len(),
                in_flight,
                self.summary.uploaded,
                self.summary.present,
                self.summary.failed,
                rate
            );
        }
        self.last_progress = (Instant::now(), self.summary.bytes);
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if !self.settings.progress_every.is_zero() {
            ctx.run_interval(self.settings.progress_every, |act, _| act.progress());
        }
    }
}

impl Handler<Enqueue> for Scheduler {
    type Result = ResponseActFuture<Self, Result<(), UploadError>>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        let paths = msg.0;
        // Counted until the last piece is admitted, so a Drain waits for all of them.
        self.enqueues_in_progress += 1;
        let journal = self.journal.clone();
        let me = ctx.address();
        let piece = self.settings.queue_bound.clamp(1, PIECE);
        let fut = async move {
            // Durable first: whatever was read is in the journal before anything waits.
            let paths =
                tokio::task::spawn_blocking(move || journal.add(&paths).map(|()| paths)).await??;
            for chunk in paths.chunks(piece) {
                me.send(Admit(chunk.to_vec())).await??;
            }
            Ok(())
        };
        Box::pin(fut.into_actor(self).map(|res, act, _| {
            act.enqueues_in_progress -= 1;
            act.answer_drains();
            res
        }))
    }
}

impl Handler<Admit> for Scheduler {
    type Result = ResponseActFuture<Self, Result<(), UploadError>>;

    fn handle(&mut self, msg: Admit, _: &mut Context<Self>) -> Self::Result {
        // Not counted in `enqueues_in_progress`: the Enqueue that sent this piece still is.
        let paths = msg.0;
        let n = paths.len() as u32;
        let permits = self.permits.clone();
        let source = self.source.clone();
        let fut = async move {
            // Wait for room: this wait is what stops the reader when uploads fall behind.
            // `n` is never more than the queue bound, so the room always comes.
            permits
                .acquire_many_owned(n)
                .await
                .expect("the scheduler never closes its semaphore")
                .forget();
            let mut closures = Vec::new();
            for p in paths {
                let c = source.closure(vec![p.clone()]).await;
                closures.push((p, c));
            }
            closures
        };
        Box::pin(fut.into_actor(self).map(|closures, act, ctx| {
            for (root, c) in closures {
                act.add_root(root, c);
            }
            act.dispatch(ctx);
            Ok(())
        }))
    }
}

impl Handler<Drain> for Scheduler {
    type Result = ResponseActFuture<Self, Summary>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.idle_now() {
            let _ = tx.send(self.summary.clone());
        } else {
            self.drain_waiters.push(tx);
        }
        Box::pin(async move { rx.await.unwrap_or_default() }.into_actor(self))
    }
}
