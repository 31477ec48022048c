//! The one place where failures become HTTP responses.
//!
//! Every handler hands its failure here with the [`Mode`] of the request, and the match below
//! is exhaustive over [`StoreError`], so a new kind of store error cannot reach a client
//! unmapped. Two modes, because the audiences differ:
//! - [`Mode::Protocol`], for Nix: anything missing, and any store failure or timeout, is a
//!   404 (Nix disables a substituter that answers 5xx for the rest of its run); malformed
//!   requests are 400; ranges outside the object are 416. Bodies carry no internal detail.
//! - [`Mode::Html`], for the explorer in a browser: an error page that says what to do, with
//!   the status that fits (404, 400, 502, 503).
//!
//! A store known to be down ([`StoreError::Unavailable`]) is a 404 for Nix too, but one that
//! must not be cached, and a 503 page in a browser.

use actix::MailboxError;
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::HttpResponse;

use super::{explorer, CacheService};
use crate::store::StoreError;

/// Why a request got no content.
#[derive(Debug)]
pub enum Failure {
    /// The store answered with an error.
    Store(StoreError),
    /// The actor that should have answered is gone (shutting down) or its mailbox closed.
    Mailbox(MailboxError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Store(e)
    }
}

impl From<MailboxError> for Failure {
    fn from(e: MailboxError) -> Failure {
        Failure::Mailbox(e)
    }
}

/// Who asked, which decides the shape of the answer.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// The Nix binary cache protocol: plain text, never 5xx.
    Protocol,
    /// An explorer page below the cache root `root`; `missing` is what the page says when
    /// the store lacks the thing asked for (an object, an entry inside a NAR).
    Html {
        /// The cache's path prefix, for links on the error page.
        root: &'a str,
        /// What to tell a person when the thing is not there.
        missing: &'static str,
    },
}

/// A plain-text response that browsers must not sniff.
pub(crate) fn text(status: StatusCode, body: &'static str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

/// The protocol's 404, cacheable for the negative TTL like a narinfo miss.
pub(crate) fn not_found(svc: &CacheService) -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("text/plain; charset=utf-8")
        .insert_header((
            header::CACHE_CONTROL,
            format!("public, max-age={}", svc.negative_ttl_secs),
        ))
        .body("404 not found\n")
}

/// The protocol's 404 for a store that is down: not to be cached, since the object may well
/// be there once the store is back.
pub(crate) fn outage() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("text/plain; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body("404 not found (the store behind this cache is down; see /healthz)\n")
}

fn unsatisfiable(total: u64) -> HttpResponse {
    HttpResponse::RangeNotSatisfiable()
        .insert_header((header::CONTENT_RANGE, format!("bytes */{total}")))
        .finish()
}

/// The response for `failure` of a request about `what` (for the log line).
pub fn respond(svc: &CacheService, mode: Mode<'_>, what: &str, failure: Failure) -> HttpResponse {
    let e = match failure {
        Failure::Store(e) => e,
        Failure::Mailbox(e) => {
            tracing::error!("{what}: store actor unavailable: {e}");
            return match mode {
                Mode::Protocol => not_found(svc),
                Mode::Html { root, .. } => explorer::error_page(
                    svc,
                    root,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The server is shutting down or overloaded. Try again in a moment.",
                ),
            };
        }
    };
    match (mode, e) {
        (_, StoreError::RangeNotSatisfiable { total }) => unsatisfiable(total),
        (Mode::Protocol, StoreError::NotFound(_)) => not_found(svc),
        (Mode::Protocol, e @ StoreError::Unavailable(_)) => {
            // The outage was logged when it began; one line per request would drown it.
            tracing::debug!("{what}: {e}; answering 404");
            outage()
        }
        (Mode::Protocol, StoreError::Invalid(m)) => {
            tracing::debug!("refused {what}: {m}");
            text(StatusCode::BAD_REQUEST, "400 bad request\n")
        }
        (
            Mode::Protocol,
            e @ (StoreError::Unsupported(_) | StoreError::Corrupt(_) | StoreError::Backend { .. }),
        ) => {
            // A 5xx would make Nix disable this substituter; the client sees a miss instead.
            tracing::warn!("{what}: {e}; answering 404");
            not_found(svc)
        }
        (Mode::Html { root, missing }, StoreError::NotFound(_)) => {
            explorer::error_page(svc, root, StatusCode::NOT_FOUND, missing)
        }
        (Mode::Html { root, .. }, StoreError::Invalid(m)) => {
            tracing::debug!("refused {what}: {m}");
            explorer::error_page(
                svc,
                root,
                StatusCode::BAD_REQUEST,
                "That address does not name anything this cache can hold: a store-path digest is 32 characters of Nix's base-32 alphabet, and paths inside a NAR have no '..', NUL or empty parts.",
            )
        }
        (Mode::Html { root, .. }, e @ StoreError::Unavailable(_)) => {
            tracing::debug!("{what}: {e}");
            explorer::error_page(
                svc,
                root,
                StatusCode::SERVICE_UNAVAILABLE,
                "This cache's store is down. It is checked every few seconds and served again as soon as it answers; /healthz says why it is down.",
            )
        }
        (Mode::Html { root, .. }, e @ StoreError::Backend { .. }) if e.is_transient() => {
            tracing::warn!("{what}: {e}");
            explorer::error_page(
                svc,
                root,
                StatusCode::SERVICE_UNAVAILABLE,
                "The store did not answer in time. Try again in a moment; the server log has the cause.",
            )
        }
        (Mode::Html { root, .. }, e @ StoreError::Corrupt(_)) => {
            tracing::warn!("{what}: {e}");
            explorer::error_page(
                svc,
                root,
                StatusCode::BAD_GATEWAY,
                "The store holds this object in a corrupt or malformed form (too large, too deep, or not what its narinfo says), so it cannot be shown. The server log says what is wrong; whoever runs the cache should replace the object.",
            )
        }
        (Mode::Html { root, .. }, StoreError::Unsupported(m)) => {
            // Something this server refuses to do (an object it will not spend the memory
            // to decode): the reason is the whole message, and retrying will not help.
            tracing::warn!("{what}: {m}");
            explorer::error_page(
                svc,
                root,
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("This cannot be shown: {m}."),
            )
        }
        (Mode::Html { root, .. }, e @ StoreError::Backend { .. }) => {
            tracing::warn!("{what}: {e}");
            explorer::error_page(
                svc,
                root,
                StatusCode::BAD_GATEWAY,
                "The store failed while reading this object. Try again; the server log has the cause.",
            )
        }
    }
}
