//! One request to one upstream, and what its reply means: found, a miss (the object is not
//! there; the upstream works), or a failure (the upstream does not work right now), which
//! counts towards skipping it ([`super::health`]).
//!
//! [`Reply::of`] and [`UpstreamError::is_transient`] are the one rule for that, used both for
//! the health accounting and for the transient flag of the [`StoreError`] a failure becomes.

use std::time::Duration;

use reqwest::header::RANGE;
use reqwest::StatusCode;
use thiserror::Error;
use url::Url;

use super::Inner;
use crate::store::StoreError;

/// Why an upstream request did not give an answer.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// No connection or no response headers within the timeout.
    #[error("{url}: no answer within {after:?}")]
    Timeout {
        /// The URL asked.
        url: Url,
        /// The timeout.
        after: Duration,
    },
    /// The request failed (DNS, connection refused, TLS, reset).
    #[error("{url}: {source}")]
    Http {
        /// The URL asked.
        url: Url,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A status that is neither found nor a miss: 5xx, or any other unexpected one.
    #[error("{url}: HTTP {status}")]
    Status {
        /// The URL asked.
        url: Url,
        /// The status.
        status: StatusCode,
    },
    /// Every upstream is being skipped after repeated failures.
    #[error("every upstream is failing and skipped for now")]
    AllSkipped,
}

impl UpstreamError {
    /// True when this failure counts against the upstream's health and the same request may
    /// succeed later: a timeout, a transport error (DNS, refused, TLS, reset), a failing
    /// status, or every upstream in its cool-down (which ends by itself). Misses (404, 403,
    /// 410) never get here: they are answers, not errors.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Timeout { .. }
            | UpstreamError::Http { .. }
            | UpstreamError::AllSkipped => true,
            UpstreamError::Status { status, .. } => Reply::of(*status) == Reply::Failed,
        }
    }

    /// The [`StoreError`] this becomes for the request about `context`, transient exactly when
    /// [`UpstreamError::is_transient`] says so.
    pub fn into_store_error(self, context: impl Into<String>) -> StoreError {
        let transient = self.is_transient();
        StoreError::backend_flagged(context, self, transient)
    }
}

/// What a status from an upstream means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reply {
    /// 2xx: the upstream has it.
    Found,
    /// 404, 403 or 410: the upstream does not have it (or will not hand it out); the next one
    /// is asked.
    Missing,
    /// Anything else (5xx, but also 401, 429 or a 3xx that was not followed): the upstream is
    /// not serving as a binary cache should, so it counts as a failure.
    Failed,
}

impl Reply {
    /// The reading of `status`.
    pub(super) fn of(status: StatusCode) -> Reply {
        match status {
            s if s.is_success() => Reply::Found,
            StatusCode::NOT_FOUND | StatusCode::FORBIDDEN | StatusCode::GONE => Reply::Missing,
            _ => Reply::Failed,
        }
    }
}

/// What one upstream said.
pub(super) enum Answer {
    /// It has the object; the response carries it.
    Found(reqwest::Response),
    /// It does not have it.
    Missing,
}

impl Inner {
    /// One request to one upstream, with the timeout and health accounting.
    pub(super) async fn ask(
        &self,
        i: usize,
        url: Url,
        head: bool,
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Answer, UpstreamError> {
        let up = &self.upstreams[i];
        let mut req = if head {
            self.http.head(url.clone())
        } else {
            self.http.get(url.clone())
        };
        // Credentials only to the upstream's own origin: a NAR named by an absolute URL on
        // another host gets none, and reqwest drops them on a redirect to another origin.
        if let Some(login) = &up.login {
            if url.origin() == up.base.origin() {
                req = req.basic_auth(&login.user, Some(&login.password));
            }
        }
        if let Some((s, e)) = range {
            req = req.header(RANGE, format!("bytes={s}-{}", e - 1));
        }
        let timeout = self.options.timeout;
        let r = match tokio::time::timeout(timeout, req.send()).await {
            Err(_) => Err(UpstreamError::Timeout {
                url,
                after: timeout,
            }),
            Ok(Err(source)) => Err(UpstreamError::Http { url, source }),
            Ok(Ok(resp)) => match Reply::of(resp.status()) {
                Reply::Found => Ok(Answer::Found(resp)),
                Reply::Missing => Ok(Answer::Missing),
                Reply::Failed => Err(UpstreamError::Status {
                    url,
                    status: resp.status(),
                }),
            },
        };
        match &r {
            Err(e) if e.is_transient() => up.health.failure(&e.to_string()),
            // A found or missing object, or a refusal that waiting would not change: the
            // upstream is up either way.
            _ => up.health.success(),
        }
        r
    }
}

/// Not found when every upstream said so; the last failure otherwise (which the HTTP layer
/// still answers as a 404, but logs).
pub(super) fn not_found_or(what: &str, err: Option<UpstreamError>) -> StoreError {
    match err {
        None => StoreError::NotFound(what.to_owned()),
        Some(e) => e.into_store_error(format!("fetching {what} from upstreams")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{UpstreamOptions, UpstreamStore};
    use super::*;
    use crate::formats::Digest;
    use crate::store::Store;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn misses_are_answers_and_everything_else_is_a_transient_failure() {
        for code in [200, 206] {
            assert_eq!(Reply::of(StatusCode::from_u16(code).unwrap()), Reply::Found);
        }
        for code in [404, 403, 410] {
            assert_eq!(
                Reply::of(StatusCode::from_u16(code).unwrap()),
                Reply::Missing
            );
        }
        for code in [500, 502, 503, 504, 401, 429, 304] {
            assert_eq!(
                Reply::of(StatusCode::from_u16(code).unwrap()),
                Reply::Failed
            );
        }
        let url = Url::parse("https://cache.example.org/x.narinfo").unwrap();
        let errors = [
            UpstreamError::Timeout {
                url: url.clone(),
                after: Duration::from_secs(5),
            },
            UpstreamError::Status {
                url,
                status: StatusCode::SERVICE_UNAVAILABLE,
            },
            UpstreamError::AllSkipped,
        ];
        for e in errors {
            assert!(e.is_transient(), "{e}");
            let mapped = e.into_store_error("fetching x");
            assert!(mapped.is_transient(), "{mapped}");
        }
    }

    /// An upstream on a local port that answers every request with `status`.
    async fn upstream_answering(status: &'static str) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        url
    }

    /// A store over `url` that skips its upstream after a single failure.
    fn store(url: Url) -> UpstreamStore {
        let mut opts = UpstreamOptions::new(vec![url]);
        opts.failures_before_skip = 1;
        opts.skip_for = Duration::from_secs(60);
        UpstreamStore::open(opts).unwrap()
    }

    #[tokio::test]
    async fn health_counts_failures_and_not_misses() {
        let digest = Digest::parse("0123456789abcdfghijklmnpqrsvwxyz").unwrap();

        let missing = store(upstream_answering("404 Not Found").await);
        for _ in 0..3 {
            assert!(missing.narinfo(&digest).await.unwrap_err().is_not_found());
        }
        assert!(missing.inner.upstreams[0].health.available());

        let failing = store(upstream_answering("503 Service Unavailable").await);
        let e = failing.narinfo(&digest).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(!failing.inner.upstreams[0].health.available());

        // A port nobody listens on any more: connection refused.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            Url::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap()
        };
        let unreachable = store(gone);
        let e = unreachable.narinfo(&digest).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(!unreachable.inner.upstreams[0].health.available());
    }
}
