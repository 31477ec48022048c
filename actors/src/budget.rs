//! Budgets: how much of one kind of work may run at once.
//!
//! A budget is an actor that owns a fixed number of slots. [`Acquire`] is answered with a
//! [`Permit`] only when a slot is free, and the handler is atomic, so while it waits the
//! requests behind it stay in the mailbox, in the order they came: callers wait in
//! `send().await`. Dropping the permit frees its slot. Each kind of work has a budget of its
//! own ([`Budgets`]), so one kind saturated (every NAR slot taken by a burst of opens) never
//! stalls another (narinfo lookups keep answering).
//!
//! Taking a slot while one is free does not go through the actor: [`acquire`] first tries the
//! slots directly (an atomic operation on the caller's thread), because a round trip to the
//! actor's thread on every NAR open measurably slowed one-connection NAR throughput (the same
//! cost that made each HTTP worker run its own fetcher). Only a caller that finds every slot
//! taken asks the actor, and waits its turn there. A free slot can only exist while no request
//! waits at the slots, so the fast path never overtakes a request the actor is serving; it may
//! overtake one still in the mailbox, in the moment between a grant and the next request.
//!
//! The queue is as long as there are callers waiting: actix lets every sender put one message
//! past a mailbox's capacity, and each request here comes from its own. What bounds it is what
//! bounds the callers (HTTP connections); a waiting request costs its message. A caller that
//! gives up while waiting costs nothing more: the mailbox skips a request nobody waits for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::fut::wrap_future;
use actix::{Actor, Addr, AtomicResponse, Context, Handler, Message};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::StoreError;

/// Slots of each budget unless configured: enough to keep a backend busy, few enough that
/// a burst cannot open thousands of connections or database handles at once.
pub const DEFAULT_SLOTS: usize = 32;

/// Slots of the explorer's whole-NAR passes unless configured: each holds a decoder and a
/// blocking thread, so fewer than the others.
pub const DEFAULT_EXPLORER_SLOTS: usize = 4;

/// Ask for a slot; answered when one is free.
#[derive(Debug, Message)]
#[rtype(result = "Permit")]
pub struct Acquire;

/// A held slot of a budget; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    counts: Arc<BudgetCounts>,
}

impl Permit {
    /// Counts `slot` as granted.
    fn grant(slot: OwnedSemaphorePermit, counts: &Arc<BudgetCounts>) -> Permit {
        counts.in_use.fetch_add(1, Ordering::Relaxed);
        counts.granted.fetch_add(1, Ordering::Relaxed);
        Permit {
            _slot: slot,
            counts: counts.clone(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counts.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a budget has done, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct BudgetCounts {
    /// Slots held now.
    pub in_use: AtomicU64,
    /// Slots handed out since start.
    pub granted: AtomicU64,
}

/// The actor owning one budget's slots.
pub struct Budget {
    slots: Arc<Semaphore>,
    counts: Arc<BudgetCounts>,
}

/// A started budget, as its users hold it.
#[derive(Clone)]
pub struct BudgetRef {
    /// What the budget is for, in errors and metrics.
    name: &'static str,
    /// How many slots it has.
    size: usize,
    addr: Addr<Budget>,
    slots: Arc<Semaphore>,
    counts: Arc<BudgetCounts>,
}

impl BudgetRef {
    /// Its counters.
    pub fn counts(&self) -> &Arc<BudgetCounts> {
        &self.counts
    }
}

impl Budget {
    /// Starts a budget named `name` (in errors and metrics) of `slots` slots (at least one).
    pub fn start(name: &'static str, slots: usize) -> BudgetRef {
        let counts = Arc::new(BudgetCounts::default());
        let size = slots.max(1);
        let slots = Arc::new(Semaphore::new(size));
        let addr = Budget {
            slots: slots.clone(),
            counts: counts.clone(),
        }
        .start();
        BudgetRef {
            name,
            size,
            addr,
            slots,
            counts,
        }
    }
}

impl Actor for Budget {
    type Context = Context<Self>;
}

impl Handler<Acquire> for Budget {
    type Result = AtomicResponse<Self, Permit>;

    fn handle(&mut self, _: Acquire, _: &mut Context<Self>) -> Self::Result {
        let slots = self.slots.clone();
        let counts = self.counts.clone();
        AtomicResponse::new(Box::pin(wrap_future::<_, Self>(async move {
            let slot = slots
                .acquire_owned()
                .await
                .expect("a budget never closes its semaphore");
            Permit::grant(slot, &counts)
        })))
    }
}

/// A slot of `budget`: at once when one is free, else when the actor grants one.
pub async fn acquire(budget: &BudgetRef) -> Result<Permit, StoreError> {
    if let Ok(slot) = budget.slots.clone().try_acquire_owned() {
        return Ok(Permit::grant(slot, &budget.counts));
    }
    budget.addr.send(Acquire).await.map_err(|e| {
        StoreError::backend(format!("waiting for a {} slot", budget.name), e.to_string())
    })
}

/// Slots per kind of work of one served store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSizes {
    /// Metadata lookups at once: narinfos, listings, the store listing for the explorer (on
    /// the local store, each holds an SQLite connection and a blocking thread).
    pub metadata: usize,
    /// NAR and build-log opens at once (until the stream is handed to the response; a
    /// stream that is being read holds no slot, see `nar_files`).
    pub nar_opens: usize,
    /// Whole-NAR passes of the explorer at once (file trees of NARs without a usable `.ls`):
    /// each holds a decoder and a blocking thread. (File views have their decoder slots.)
    pub explorer: usize,
}

impl Default for BudgetSizes {
    fn default() -> Self {
        BudgetSizes {
            metadata: DEFAULT_SLOTS,
            nar_opens: DEFAULT_SLOTS,
            explorer: DEFAULT_EXPLORER_SLOTS,
        }
    }
}

/// The budgets of one served store.
#[derive(Clone)]
pub struct Budgets {
    /// See [`BudgetSizes::metadata`].
    pub metadata: BudgetRef,
    /// See [`BudgetSizes::nar_opens`].
    pub nar_opens: BudgetRef,
    /// See [`BudgetSizes::explorer`].
    pub explorer: BudgetRef,
}

impl Budgets {
    /// Starts the three budgets.
    pub fn start(sizes: BudgetSizes) -> Budgets {
        Budgets {
            metadata: Budget::start("metadata", sizes.metadata),
            nar_opens: Budget::start("nar_opens", sizes.nar_opens),
            explorer: Budget::start("explorer", sizes.explorer),
        }
    }

    /// The budgets' gauges and counters in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        let all = [&self.metadata, &self.nar_opens, &self.explorer];
        let mut out = String::from(
            "# HELP nixcached_budget_slots Slots of each budget (--metadata-slots, --nar-slots, --explorer-slots).\n# TYPE nixcached_budget_slots gauge\n",
        );
        for b in all {
            out.push_str(&format!(
                "nixcached_budget_slots{{budget=\"{}\"}} {}\n",
                b.name, b.size
            ));
        }
        out.push_str(
            "# HELP nixcached_budget_in_use Slots of each budget held now.\n# TYPE nixcached_budget_in_use gauge\n",
        );
        for b in all {
            let n = b.counts.in_use.load(Ordering::Relaxed);
            out.push_str(&format!(
                "nixcached_budget_in_use{{budget=\"{}\"}} {n}\n",
                b.name
            ));
        }
        out.push_str(
            "# HELP nixcached_budget_granted_total Slots each budget handed out.\n# TYPE nixcached_budget_granted_total counter\n",
        );
        for b in all {
            let n = b.counts.granted.load(Ordering::Relaxed);
            out.push_str(&format!(
                "nixcached_budget_granted_total{{budget=\"{}\"}} {n}\n",
                b.name
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// With 3 slots: exactly 3 of 10 callers hold a permit while they keep them, the others
    /// wait in order; a caller that gives up is skipped; once the holders let go, every one
    /// of the 10 gets its slot, in the order it asked.
    #[actix::test]
    async fn binds_at_its_slots_and_lets_everything_through_afterwards() {
        let budget = Budget::start("test", 3);
        let counts = budget.counts().clone();
        let granted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (release, released) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for i in 0..10 {
            let budget = budget.clone();
            let granted = granted.clone();
            let mut released = released.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = acquire(&budget).await.unwrap();
                granted.lock().unwrap().push(i);
                released.wait_for(|r| *r).await.unwrap();
            }));
            // One at a time, so that the mailbox order is the spawn order.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*granted.lock().unwrap(), vec![0, 1, 2], "exactly the slots");
        assert_eq!(counts.in_use.load(Ordering::Relaxed), 3);
        // A caller that gives up while queued: its request is never granted.
        let quitter = tokio::spawn({
            let budget = budget.clone();
            async move { acquire(&budget).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        quitter.abort();
        release.send(true).unwrap();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("every held-back request gets through")
                .unwrap();
        }
        assert_eq!(*granted.lock().unwrap(), (0..10).collect::<Vec<_>>());
        assert_eq!(counts.granted.load(Ordering::Relaxed), 10);
        assert_eq!(counts.in_use.load(Ordering::Relaxed), 0);
    }
}
