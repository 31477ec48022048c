//! Decoder slots: a bound on how many decompressing readers are alive at once, and the way a
//! reader whose client stalls gives its decoder back.
//!
//! A streamed file view needs a decoder for as long as it produces bytes, and a decoder keeps
//! its window (2 MiB for Nix's zstd, 8 MiB for its xz). A client that stops reading stops
//! polling its stream, so the stream cannot notice and free anything itself. So the live
//! reader sits in a [`Slot`] the pool can reach: when every slot is taken, a new reader takes
//! the one idle longest (not used for the pool's idle time), dropping that reader's decoder.
//! The stalled stream finds its slot empty when it is polled again, waits for a slot and
//! reopens its NAR where it was. At most `capacity` decoders are alive, however many clients
//! stall; a stalled one costs its position. Waiting for a slot is what bounds concurrent
//! decoding too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A fixed number of slots for live readers of type `T`.
pub(crate) struct Slots<T> {
    capacity: usize,
    /// How long a reader must have gone unused before another may take its slot: long
    /// enough that a client which reads steadily keeps its decoder, short enough that a
    /// burst of stalling clients starts quickly.
    idle: Duration,
    held: Mutex<Vec<Arc<Slot<T>>>>,
    freed: Notify,
}

/// One live reader's place in the pool.
pub(crate) struct Slot<T> {
    live: Mutex<Live<T>>,
    /// Being filled (a seek on a blocking thread): working, not stalled, so not taken.
    busy: AtomicBool,
}

struct Live<T> {
    reader: Option<T>,
    last_used: Instant,
    /// The task that last used the reader: woken when the slot is taken, so that a stream
    /// waiting on its source (whose waker went with the reader) learns it must reopen.
    waker: Option<Waker>,
}

/// A slot held by one stream; gives the slot back when dropped.
pub(crate) struct Held<T> {
    slot: Arc<Slot<T>>,
    slots: Arc<Slots<T>>,
}

fn lock<U>(m: &Mutex<U>) -> MutexGuard<'_, U> {
    // A panic while holding a lock here leaves at worst one broken response; the data is
    // still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Slots<T> {
    /// `capacity` slots, taken from readers unused for `idle`.
    pub(crate) fn new(capacity: usize, idle: Duration) -> Arc<Slots<T>> {
        Arc::new(Slots {
            capacity: capacity.max(1),
            idle,
            held: Mutex::new(Vec::new()),
            freed: Notify::new(),
        })
    }

    /// A busy, empty slot: a free one, or the one whose reader is idle longest (that reader
    /// is dropped), or the first to come free.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Held<T> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so that a release between the look and the wait
            // still wakes this waiter.
            freed.as_mut().enable();
            let fresh = Arc::new(Slot {
                live: Mutex::new(Live {
                    reader: None,
                    last_used: Instant::now(),
                    waker: None,
                }),
                busy: AtomicBool::new(true),
            });
            let wait = {
                let mut held = lock(&self.held);
                if held.len() < self.capacity {
                    held.push(fresh.clone());
                    Ok(None)
                } else {
                    let now = Instant::now();
                    let oldest = held
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| !s.busy.load(Ordering::Acquire))
                        .map(|(i, s)| (i, lock(&s.live).last_used))
                        .min_by_key(|&(_, t)| t);
                    match oldest {
                        Some((i, t)) if now.saturating_duration_since(t) >= self.idle => {
                            Ok(Some(std::mem::replace(&mut held[i], fresh.clone())))
                        }
                        Some((_, t)) => Err((t + self.idle).saturating_duration_since(now)),
                        None => Err(self.idle),
                    }
                }
            };
            match wait {
                Ok(victim) => {
                    if let Some(victim) = victim {
                        // Dropped outside the pool's lock: freeing a decoder takes a while.
                        let (reader, waker) = {
                            let mut live = lock(&victim.live);
                            (live.reader.take(), live.waker.take())
                        };
                        drop(reader);
                        if let Some(w) = waker {
                            w.wake();
                        }
                    }
                    return Held {
                        slot: fresh,
                        slots: self.clone(),
                    };
                }
                Err(d) => {
                    let _ = tokio::time::timeout(d.max(Duration::from_millis(1)), freed).await;
                }
            }
        }
    }
}

impl<T> Held<T> {
    /// Puts the reader in: from now on it may be taken once it goes unused.
    pub(crate) fn fill(&self, reader: T) {
        let mut live = lock(&self.slot.live);
        live.reader = Some(reader);
        live.last_used = Instant::now();
        self.slot.busy.store(false, Ordering::Release);
    }

    /// Runs `f` on the reader, or answers `None` when the pool has taken it.
    pub(crate) fn with<R>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut T, &mut Context<'_>) -> R,
    ) -> Option<R> {
        let mut live = lock(&self.slot.live);
        live.last_used = Instant::now();
        if !live.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            live.waker = Some(cx.waker().clone());
        }
        let reader = live.reader.as_mut()?;
        Some(f(reader, cx))
    }
}

impl<T> Drop for Held<T> {
    fn drop(&mut self) {
        let mine = {
            let mut held = lock(&self.slots.held);
            let at = held.iter().position(|s| Arc::ptr_eq(s, &self.slot));
            at.map(|i| held.swap_remove(i))
        };
        // A slot the pool took already was handed on; only a slot still ours frees one.
        if let Some(slot) = mine {
            let reader = lock(&slot.live).reader.take();
            drop(reader);
            self.slots.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_reader_gives_its_slot_to_a_new_one() {
        let slots = Slots::<u32>::new(2, Duration::from_millis(50));
        let waker = futures::task::noop_waker();
        let cx = &mut Context::from_waker(&waker);
        let a = slots.acquire().await;
        a.fill(1);
        let b = slots.acquire().await;
        b.fill(2);
        tokio::time::sleep(Duration::from_millis(30)).await;
        // b stays in use; a goes idle and is the one taken.
        assert_eq!(b.with(cx, |r, _| *r), Some(2));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let c = slots.acquire().await;
        c.fill(3);
        assert_eq!(a.with(cx, |r, _| *r), None, "the idle reader was taken");
        assert_eq!(b.with(cx, |r, _| *r), Some(2));
        assert_eq!(lock(&slots.held).len(), 2);
        // The stream whose reader was taken waits for a slot again: b's, once b is gone.
        drop(a);
        drop(b);
        let d = slots.acquire().await;
        d.fill(4);
        assert_eq!(c.with(cx, |r, _| *r), Some(3));
        assert_eq!(lock(&slots.held).len(), 2);
    }

    #[tokio::test]
    async fn busy_slots_are_never_taken() {
        let slots = Slots::<u32>::new(1, Duration::from_millis(10));
        let a = slots.acquire().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiting = tokio::time::timeout(Duration::from_millis(100), slots.acquire()).await;
        assert!(waiting.is_err(), "a seeking reader keeps its slot");
        drop(a);
        let b = tokio::time::timeout(Duration::from_secs(5), slots.acquire()).await;
        assert!(b.is_ok(), "a released slot goes to the waiter");
    }
}
