//! How often and how patiently a request is tried again when GCS or the network fails
//! transiently: one loop, shared by plain requests and resumable-upload chunks.

use std::future::Future;
use std::time::Duration;

use super::error::GcsError;

/// Attempts for one request when GCS or the network fails transiently.
pub(super) const ATTEMPTS: u32 = 5;

/// The wait after the `attempt`th failure (counting from 1): 200 ms, doubling up to 6.4 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 << attempt.min(6))
}

/// Runs `attempt` until it succeeds, fails for good, or has failed [`ATTEMPTS`] times.
pub(super) async fn retry<T, A, AF>(attempt: A) -> Result<T, GcsError>
where
    A: FnMut() -> AF,
    AF: Future<Output = Result<T, GcsError>>,
{
    retry_or_recover(attempt, || async { None }).await
}

/// [`retry`], where after each wait `recover` may answer instead of another attempt: a
/// chunk whose answer was lost may have reached GCS in whole or in part, and the upload
/// goes on from what GCS holds rather than resending blindly. `None` means attempt again.
pub(super) async fn retry_or_recover<T, A, AF, R, RF>(
    mut attempt: A,
    mut recover: R,
) -> Result<T, GcsError>
where
    A: FnMut() -> AF,
    AF: Future<Output = Result<T, GcsError>>,
    R: FnMut() -> RF,
    RF: Future<Output = Option<T>>,
{
    let mut failures = 0;
    loop {
        let err = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        failures += 1;
        if failures >= ATTEMPTS || !err.is_transient() {
            return Err(err);
        }
        tokio::time::sleep(backoff(failures)).await;
        if let Some(v) = recover().await {
            return Ok(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use reqwest::StatusCode;

    use super::*;

    /// An attempt that fails with `code` the first `fails` times, then answers its number.
    fn flaky(
        tries: &Cell<u32>,
        fails: u32,
        code: u16,
    ) -> impl FnMut() -> std::future::Ready<Result<u32, GcsError>> + '_ {
        move || {
            tries.set(tries.get() + 1);
            std::future::ready(if tries.get() <= fails {
                Err(GcsError::of_status(code))
            } else {
                Ok(tries.get())
            })
        }
    }

    #[test]
    fn backoff_doubles_and_stops_growing() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(1600));
        assert_eq!(backoff(6), backoff(60));
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let tries = Cell::new(0);
        let e = retry(flaky(&tries, 1, 403)).await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::FORBIDDEN));
        assert_eq!(tries.get(), 1);
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let tries = Cell::new(0);
        assert_eq!(retry(flaky(&tries, 2, 503)).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn retries_stop_after_the_last_attempt() {
        let tries = Cell::new(0);
        let e = retry(flaky(&tries, u32::MAX, 429)).await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(tries.get(), ATTEMPTS);
    }

    #[tokio::test]
    async fn recovery_answers_instead_of_another_attempt() {
        let tries = Cell::new(0);
        let recovered = retry_or_recover(flaky(&tries, 1, 500), || async { Some(42) }).await;
        assert_eq!(recovered.unwrap(), 42);
        assert_eq!(tries.get(), 1);
        let tries = Cell::new(0);
        let resent = retry_or_recover(flaky(&tries, 1, 500), || async { None }).await;
        assert_eq!(resent.unwrap(), 2);
    }
}
