//! Per-upstream circuit breaker: an upstream that keeps failing is skipped for a while, so
//! every request does not pay its timeout before reaching the next one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The state of one upstream.
#[derive(Debug)]
pub struct Health {
    name: String,
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failures_in_a_row: u32,
    skipped_until: Option<Instant>,
}

impl Health {
    /// An upstream named `name` (for logs), skipped for `cooldown` after `threshold` failures
    /// in a row (a threshold of 0 never skips).
    pub fn new(name: String, threshold: u32, cooldown: Duration) -> Health {
        Health {
            name,
            threshold,
            cooldown,
            state: Mutex::new(State::default()),
        }
    }

    /// False while the upstream is in its cool-down. Once the cool-down is over requests go
    /// through again (the breaker is half open): the first failure re-opens it for another
    /// cool-down, the first success closes it.
    pub fn available(&self) -> bool {
        let st = self.state.lock().expect("health lock");
        st.skipped_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Records an answer (found or not found: the upstream works).
    pub fn success(&self) {
        let mut st = self.state.lock().expect("health lock");
        if st.skipped_until.take().is_some() {
            tracing::info!("upstream {} answers again; using it again", self.name);
        }
        st.failures_in_a_row = 0;
    }

    /// Records a failure (connection error, timeout, 5xx); trips the breaker at the threshold.
    pub fn failure(&self, why: &str) {
        let mut st = self.state.lock().expect("health lock");
        st.failures_in_a_row += 1;
        let half_open = st.skipped_until.is_some_and(|t| Instant::now() >= t);
        if self.threshold > 0 && (st.failures_in_a_row >= self.threshold || half_open) {
            let first_trip = st.skipped_until.is_none();
            st.skipped_until = Some(Instant::now() + self.cooldown);
            if first_trip {
                tracing::warn!(
                    "upstream {} failed {} times in a row (last: {why}); skipping it for {:?} \
                     (check that it is reachable, or raise --upstream-timeout)",
                    self.name,
                    st.failures_in_a_row,
                    self.cooldown
                );
            } else {
                tracing::debug!("upstream {} still failing ({why})", self.name);
            }
        } else {
            tracing::debug!("upstream {} failed ({why})", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_the_threshold_and_recovers_after_the_cooldown() {
        let h = Health::new("u".into(), 2, Duration::from_millis(50));
        assert!(h.available());
        h.failure("x");
        assert!(h.available(), "one failure is not enough");
        h.failure("x");
        assert!(!h.available(), "two in a row trip it");
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.available(), "half open after the cool-down");
        h.failure("x");
        assert!(!h.available(), "a failure while half open re-opens at once");
        std::thread::sleep(Duration::from_millis(60));
        h.success();
        h.failure("x");
        assert!(h.available(), "success reset the count");
    }

    #[test]
    fn success_resets_the_count() {
        let h = Health::new("u".into(), 2, Duration::from_secs(60));
        h.failure("x");
        h.success();
        h.failure("x");
        assert!(h.available());
    }
}
