//! How often and how patiently a request is tried again when GCS or the network fails
//! transiently.

use std::time::Duration;

/// Attempts for one request when GCS or the network fails transiently.
pub(super) const ATTEMPTS: u32 = 5;

/// The wait after the `attempt`th failure (counting from 1): 200 ms, doubling up to 6.4 s.
pub(super) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 << attempt.min(6))
}
