//! Progress of a long pass over a cache (`fsck`, `gc`), for a line on a terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters a pass updates and a reporter reads.
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Starts a phase of `total` steps (0: unknown).
    pub fn phase(&self, name: &'static str, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = name;
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// One more step done.
    pub fn step(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// The line to show: `PHASE DONE/TOTAL (PCT%)`, or `PHASE` before anything is counted.
    pub fn line(&self) -> String {
        let phase = *self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        match (done, total) {
            (0, 0) => phase.to_owned(),
            (d, 0) => format!("{phase} {d}"),
            (d, t) => format!("{phase} {d}/{t} ({}%)", d.min(t) * 100 / t),
        }
    }
}

/// Calls `f` on `progress` if there is one.
pub(crate) fn with(progress: &Option<std::sync::Arc<Progress>>, f: impl FnOnce(&Progress)) {
    if let Some(p) = progress {
        f(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let p = Progress::default();
        assert_eq!(p.line(), "");
        p.phase("listing", 0);
        assert_eq!(p.line(), "listing");
        p.phase("reading narinfos", 4);
        p.step();
        assert_eq!(p.line(), "reading narinfos 1/4 (25%)");
        p.phase("removing", 0);
        p.step();
        p.step();
        assert_eq!(p.line(), "removing 2");
    }
}
