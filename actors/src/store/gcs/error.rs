//! What goes wrong on the wire ([`GcsError`]), which of it is worth retrying, and how it is
//! put in a user's terms as a [`StoreError`].

use std::sync::atomic::Ordering;

use reqwest::{Response, StatusCode};
use serde::Deserialize;
use thiserror::Error;

use super::GcsBlobs;
use crate::store::StoreError;

/// What went wrong on the wire, before it is put in a user's terms.
#[derive(Debug, Error)]
pub(super) enum GcsError {
    #[error("GCS answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("{}", chain(.0))]
    Http(#[source] reqwest::Error),
    #[error("getting a Google access token: {}", chain(.0))]
    Token(#[source] gcp_auth::Error),
    #[error("unusable Google credentials: {0}")]
    Credentials(String),
    #[error("unexpected answer from GCS: {0}")]
    Protocol(String),
}

impl GcsError {
    pub(super) fn status(&self) -> Option<StatusCode> {
        match self {
            GcsError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth trying again: the network, throttling, or GCS's own trouble.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            GcsError::Status { status, .. } => transient_status(*status),
            // Body and decode errors come only from reading an answer (the connection
            // dropped midway), never from sending one, so they change no retry here; they
            // keep a listing cut short as transient as a request cut short.
            GcsError::Http(e) => {
                e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() || e.is_decode()
            }
            _ => false,
        }
    }

    /// The error an unwanted answer stands for, with GCS's own message when it sent one.
    pub(super) async fn from_response(resp: Response) -> GcsError {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        #[derive(Deserialize)]
        struct Body {
            error: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            message: String,
        }
        let message = match serde_json::from_str::<Body>(&body) {
            Ok(b) => b.error.message,
            Err(_) => body.chars().take(300).collect::<String>().trim().to_owned(),
        };
        GcsError::Status { status, message }
    }
}

fn transient_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT
}

/// An error and its causes on one line; reqwest keeps the useful part ("connection
/// refused") in its sources.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

impl GcsBlobs {
    /// Whether the bucket exists: `Some(false)` only when GCS said so.
    async fn bucket_exists(&self, probe: &str) -> Option<bool> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Some(true);
        }
        let url = self.list_url(&[("prefix", probe), ("maxResults", "1")]);
        let r = self.send(|| self.http.get(&url)).await;
        match r {
            Ok(_) => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Some(true)
            }
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Some(false),
            Err(_) => None,
        }
    }

    /// Puts a wire error about `key` in terms a user can act on.
    pub(super) async fn fail(&self, doing: &str, key: &str, e: GcsError) -> StoreError {
        if e.status() == Some(StatusCode::NOT_FOUND) {
            if self.bucket_exists(&self.full_name(key)).await == Some(false) {
                return self.no_bucket(e);
            }
            return StoreError::NotFound(key.into());
        }
        self.classify(doing, &self.url_of(key), e)
    }

    /// The error for a 404 that GCS gave because the bucket, not an object, is missing;
    /// permanent, as only creating the bucket or fixing the URL helps.
    pub(super) fn no_bucket(&self, e: GcsError) -> StoreError {
        StoreError::backend_permanent(
            format!(
                "GCS bucket {:?} does not exist at {} (create it, or check the gs:// URL)",
                self.options.bucket, self.endpoint.base
            ),
            e,
        )
    }

    /// Puts a wire error about `what` in terms a user can act on, when a 404 cannot mean a
    /// missing object.
    pub(super) fn classify(&self, doing: &str, what: &str, e: GcsError) -> StoreError {
        let why = match &e {
            GcsError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                Some("GCS refused the credentials".to_owned())
            }
            GcsError::Status { status, .. }
                if *status == StatusCode::FORBIDDEN && self.auth.is_anonymous() =>
            {
                Some("GCS denied anonymous access; no Google credentials were found (set GOOGLE_APPLICATION_CREDENTIALS or run on GCP)".to_owned())
            }
            GcsError::Status { status, .. } if *status == StatusCode::FORBIDDEN => Some(
                "GCS denied access (the credentials lack permission on this bucket)".to_owned(),
            ),
            GcsError::Http(h) if h.is_connect() || h.is_timeout() => Some(format!(
                "cannot reach the GCS endpoint {}",
                self.endpoint.base
            )),
            GcsError::Token(_) | GcsError::Credentials(_) => {
                Some("Google credentials were found but do not work".into())
            }
            _ => None,
        };
        let context = match why {
            Some(why) => format!("{doing} {what}: {why}"),
            None => format!("{doing} {what}"),
        };
        // The same rule as the retries here: what they gave up on may work later (a 503, a
        // dropped connection), what they never retried will not (a 403, bad credentials).
        let transient = e.is_transient();
        StoreError::backend_flagged(context, e, transient)
    }
}

#[cfg(test)]
impl GcsError {
    /// An error status as GCS answers it, for the tests of this folder.
    pub(super) fn of_status(code: u16) -> GcsError {
        GcsError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            message: "no".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::blobs::Blobs;
    use crate::store::gcs::GcsOptions;

    fn blobs() -> GcsBlobs {
        blobs_at("http://127.0.0.1:9".into())
    }

    #[test]
    fn errors_name_their_cause() {
        let b = blobs();
        let e = b
            .classify("reading", "gs://b/k", GcsError::of_status(401))
            .to_string();
        assert!(e.contains("GCS refused the credentials"), "{e}");
        let e = b
            .classify("reading", "gs://b/k", GcsError::of_status(403))
            .to_string();
        assert!(e.contains("GCS denied access"), "{e}");
        let e = b
            .classify("reading", "gs://b/k", GcsError::of_status(500))
            .to_string();
        assert!(e.starts_with("reading gs://b/k: GCS answered 500"), "{e}");
        assert!(GcsError::of_status(503).is_transient() && GcsError::of_status(429).is_transient());
        assert!(!GcsError::of_status(404).is_transient());
    }

    #[test]
    fn mapped_errors_say_whether_trying_again_can_help() {
        let b = blobs();
        let map = |e| b.classify("reading", "gs://b/k", e);
        assert!(map(GcsError::of_status(503)).is_transient());
        assert!(map(GcsError::of_status(429)).is_transient());
        assert!(map(GcsError::of_status(408)).is_transient());
        assert!(!map(GcsError::of_status(403)).is_transient());
        assert!(!map(GcsError::of_status(401)).is_transient());
        assert!(!map(GcsError::of_status(400)).is_transient());
        assert!(!b.no_bucket(GcsError::of_status(404)).is_transient());
        let creds =
            GcsError::Credentials("GOOGLE_APPLICATION_CREDENTIALS=/nowhere: no such file".into());
        assert!(!map(creds).is_transient());
    }

    /// A server at `http://127.0.0.1:PORT` that answers every request with `answer` and
    /// closes the connection.
    async fn answering(answer: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        base
    }

    fn blobs_at(endpoint: String) -> GcsBlobs {
        GcsBlobs::open(&GcsOptions {
            bucket: "b".into(),
            endpoint: Some(endpoint),
            ..GcsOptions::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_missing_bucket_is_permanent() {
        let body = r#"{"error":{"message":"The specified bucket does not exist."}}"#;
        let b = blobs_at(
            answering(format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            ))
            .await,
        );
        let e = b.head("k").await.unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!e.is_transient(), "{e}");
        let e = b.list("").await.unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_transient() {
        let b = blobs_at(
            answering(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{\"items\":".into(),
            )
            .await,
        );
        let e = b.list("").await.unwrap_err();
        assert!(e.to_string().starts_with("listing gs://b/"), "{e}");
        assert!(e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_transient() {
        // A port that was just free: connecting to it is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let b = blobs_at(format!("http://127.0.0.1:{port}"));
        let e = b.send_once(b.http.get(b.list_url(&[]))).await.unwrap_err();
        let e = b.classify("listing", "gs://b/", e);
        assert!(e.to_string().contains("cannot reach"), "{e}");
        assert!(e.is_transient(), "{e}");
    }
}
