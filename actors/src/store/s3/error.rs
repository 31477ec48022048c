//! Turning `object_store` errors into [`StoreError`]s that say what to do, and whether trying
//! again can help.
//!
//! An error is classified by what is typed first: the `object_store::Error` variant (which
//! follows the HTTP status) and the transport failure behind it. S3's own error code comes
//! from the one place it can be read, `error_code`; the credential endpoints from
//! [`asked_credential_endpoint`].

use object_store::client::{HttpError, HttpErrorKind};

use super::error_code::{s3_error_code, S3ErrorCode};
use crate::store::StoreError;

/// The bucket requests go to, as error messages name it.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The bucket name.
    pub bucket: String,
    /// The endpoint requests go to.
    pub endpoint: String,
    /// The region requests are signed for.
    pub region: String,
}

/// Why a request failed, in the terms the messages and the retry rule need.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cause {
    /// The bucket does not exist.
    NoBucket,
    /// S3 did not accept the credentials themselves.
    RefusedCredentials,
    /// The credentials were accepted but lack permission.
    Denied,
    /// The credential chain ended at the metadata services, which had none.
    NoCredentials,
    /// The bucket is in another region than the one requests are signed for.
    WrongRegion,
    /// The endpoint could not be connected to, or did not answer in time.
    Unreachable,
    /// Anything else; `transient` unless it is known that retrying cannot help.
    Other {
        /// True when the same request may succeed later.
        transient: bool,
    },
}

impl Cause {
    /// Whether retrying can help: only a change of configuration fixes the named causes
    /// other than an unreachable endpoint.
    fn is_transient(&self) -> bool {
        match self {
            Cause::Unreachable => true,
            Cause::Other { transient } => *transient,
            Cause::NoBucket
            | Cause::RefusedCredentials
            | Cause::Denied
            | Cause::NoCredentials
            | Cause::WrongRegion => false,
        }
    }
}

/// Classifies an error: S3's code when there is one (it is the most precise), then the
/// `object_store` variant, the credential endpoints and the transport failure.
fn cause_of(e: &object_store::Error) -> Cause {
    use object_store::Error as E;
    use S3ErrorCode as C;
    let code = s3_error_code(e);
    match &code {
        Some(C::NoSuchBucket) => return Cause::NoBucket,
        Some(
            C::InvalidAccessKeyId
            | C::SignatureDoesNotMatch
            | C::ExpiredToken
            | C::InvalidToken
            | C::TokenRefreshRequired,
        ) => return Cause::RefusedCredentials,
        Some(C::AccessDenied) => return Cause::Denied,
        Some(C::PermanentRedirect | C::AuthorizationHeaderMalformed) => return Cause::WrongRegion,
        _ => {}
    }
    // A 401 or 403 whose code adds nothing (and every one to HEAD, which has no body) is a
    // refusal all the same: new credentials or permissions are what helps.
    if matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. }) {
        return Cause::Denied;
    }
    // Checked before the transport kind: the metadata services are reached over the same
    // kind of connection, and failing to reach them means there were no credentials at all.
    if asked_credential_endpoint(e) {
        return Cause::NoCredentials;
    }
    if let Some(HttpErrorKind::Connect | HttpErrorKind::Timeout) = http_error_kind(e) {
        return Cause::Unreachable;
    }
    let transient = match (e, &code) {
        // A 404 stays a 404, and what object_store cannot do it never will.
        (E::NotFound { .. } | E::NotSupported { .. } | E::NotImplemented { .. }, _) => false,
        (_, Some(C::NoSuchKey)) => false,
        // SlowDown, InternalError, ServiceUnavailable, RequestTimeout, other 5xx, resets and
        // anything not recognised: S3 documents the first as worth retrying, and for the rest
        // nothing says retrying is useless.
        _ => true,
    };
    Cause::Other { transient }
}

impl Target {
    /// The error for a bucket that S3 said does not exist.
    pub(super) fn no_bucket(&self, e: object_store::Error) -> StoreError {
        StoreError::backend_permanent(
            format!(
                "S3 bucket {:?} does not exist at {} (create it, or check the s3:// URL's bucket, region and endpoint)",
                self.bucket, self.endpoint
            ),
            e,
        )
    }

    /// Turns an `object_store` error from `doing` (reading, writing...) `what` (an `s3://`
    /// URL) into what a user can act on. A missing bucket is left to the caller, who says so
    /// with [`Target::no_bucket`] (and may need to ask S3 first, as a `HEAD` cannot tell).
    pub(super) fn classify(&self, doing: &str, what: &str, e: object_store::Error) -> StoreError {
        let cause = cause_of(&e);
        let why = match &cause {
            Cause::RefusedCredentials => Some("S3 refused the credentials".to_owned()),
            Cause::Denied => Some(
                "S3 denied access (the credentials lack permission, or the bucket belongs to someone else)"
                    .to_owned(),
            ),
            Cause::NoCredentials => Some(
                "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, add \
                 profile= or a default profile in ~/.aws, or run where the instance or container \
                 metadata service provides a role)"
                    .to_owned(),
            ),
            Cause::Unreachable => Some(format!("cannot reach the S3 endpoint {}", self.endpoint)),
            Cause::WrongRegion => Some(format!(
                "the bucket is in another region than {:?}; set region= in the s3:// URL",
                self.region
            )),
            Cause::NoBucket | Cause::Other { .. } => None,
        };
        let context = match why {
            Some(why) => format!("{doing} {what}: {why}"),
            None => format!("{doing} {what}"),
        };
        StoreError::backend_flagged(context, e, cause.is_transient())
    }
}

/// S3 said the bucket does not exist.
pub(super) fn is_no_bucket(e: &object_store::Error) -> bool {
    s3_error_code(e) == Some(S3ErrorCode::NoSuchBucket)
}

/// Whether the error is a failed request to the EC2 instance metadata service or the ECS
/// container credential endpoint, which `object_store` asks when nothing earlier in the chain
/// had credentials.
///
/// Those providers are crate-private in `object_store` and wrap their failures in
/// `Error::Generic` like any other S3 error, so the only public trace of which provider
/// failed is the URL in the error's text (the metadata services answer at fixed link-local
/// addresses, and `object_store` does not redact those URLs).
fn asked_credential_endpoint(e: &object_store::Error) -> bool {
    let text = e.to_string();
    ["169.254.169.254", "169.254.170.2"]
        .iter()
        .any(|host| text.contains(host))
}

/// The transport failure behind an error, if that is what it is.
fn http_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return Some(h.kind());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::error_code::tests::answer;
    use super::*;

    fn target() -> Target {
        Target {
            bucket: "b".into(),
            endpoint: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
        }
    }

    /// An error `object_store` leaves unclassified, with this text as its cause.
    fn generic(body: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: body.to_owned().into(),
        }
    }

    /// A 403, with this text as its cause.
    fn denied(body: &str) -> object_store::Error {
        object_store::Error::PermissionDenied {
            path: "k".into(),
            source: body.to_owned().into(),
        }
    }

    /// A transport failure of this kind, wrapped as `object_store` wraps it.
    fn transport(kind: HttpErrorKind) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(
                kind,
                std::io::Error::other("error sending request"),
            )),
        }
    }

    /// The message and the transient flag of an error met while reading `s3://b/k`.
    fn say(e: object_store::Error) -> (String, bool) {
        let e = target().classify("reading", "s3://b/k", e);
        (e.to_string(), e.is_transient())
    }

    #[test]
    fn errors_name_their_cause() {
        let say = |e| self::say(e).0;
        let e = say(denied("<Code>InvalidAccessKeyId</Code>"));
        assert!(e.contains("S3 refused the credentials"), "{e}");
        let e = say(denied("<Code>SignatureDoesNotMatch</Code>"));
        assert!(e.contains("S3 refused the credentials"), "{e}");
        let e = say(denied("<Code>AccessDenied</Code>"));
        assert!(e.contains("S3 denied access"), "{e}");
        let e = say(generic(
            "Error performing PUT http://169.254.169.254/latest/api/token",
        ));
        assert!(e.contains("no AWS credentials found"), "{e}");
        let e = say(generic("<Code>PermanentRedirect</Code>"));
        assert!(e.contains("another region"), "{e}");
        let e = say(generic("<Code>NoSuchBucket</Code>"));
        assert!(e.contains("reading s3://b/k"), "{e}");
        assert!(is_no_bucket(&generic("<Code>NoSuchBucket</Code>")));
    }

    #[test]
    fn refused_credentials_are_permanent() {
        for code in [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "InvalidToken",
            "TokenRefreshRequired",
        ] {
            // A GET answers 403; a listing's 403 reaches us unclassified.
            for e in [
                denied(&answer("403 Forbidden", code)),
                generic(&answer("403 Forbidden", code)),
            ] {
                let (e, transient) = say(e);
                assert!(e.contains("S3 refused the credentials"), "{e}");
                assert!(!transient, "{e}");
            }
        }
        let (e, transient) = say(object_store::Error::Unauthenticated {
            path: "k".into(),
            source: answer("401 Unauthorized", "ExpiredToken").into(),
        });
        assert!(
            e.contains("S3 refused the credentials") && !transient,
            "{e}"
        );
    }

    #[test]
    fn denied_access_is_permanent() {
        for e in [
            denied(&answer("403 Forbidden", "AccessDenied")),
            generic(&answer("403 Forbidden", "AccessDenied")),
            // HEAD has no body to carry a code.
            denied("Server returned non-2xx status code: 403 Forbidden: "),
        ] {
            let (e, transient) = say(e);
            assert!(e.contains("S3 denied access"), "{e}");
            assert!(!transient, "{e}");
        }
    }

    #[test]
    fn missing_buckets_are_permanent() {
        let e = generic(&answer("404 Not Found", "NoSuchBucket"));
        assert!(is_no_bucket(&e));
        let told = target().no_bucket(e);
        let text = told.to_string();
        assert!(
            text.contains("S3 bucket \"b\" does not exist at http://127.0.0.1:9"),
            "{text}"
        );
        assert!(text.contains("create it"), "{text}");
        assert!(!told.is_transient());
        let (e, transient) = say(generic(&answer("404 Not Found", "NoSuchBucket")));
        assert!(!transient, "{e}");
        assert!(!is_no_bucket(&generic(&answer(
            "404 Not Found",
            "NoSuchKey"
        ))));
    }

    #[test]
    fn missing_credentials_are_permanent() {
        for url in [
            "PUT http://169.254.169.254/latest/api/token",
            "GET http://169.254.170.2/v2/credentials/abc",
        ] {
            let e = object_store::Error::Generic {
                store: "S3",
                source: format!("Error performing {url} in 5s - HTTP error: error sending request")
                    .into(),
            };
            let (e, transient) = say(e);
            assert!(e.contains("no AWS credentials found"), "{e}");
            assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");
            assert!(!transient, "{e}");
        }
    }

    #[test]
    fn other_regions_are_permanent() {
        for e in [
            generic(&answer("301 Moved Permanently", "PermanentRedirect")),
            generic(&answer("400 Bad Request", "AuthorizationHeaderMalformed")),
            generic(
                "Error performing HEAD http://127.0.0.1:9/b/k in 3ms - Received redirect without \
                 LOCATION, this normally indicates an incorrectly configured region",
            ),
        ] {
            let (e, transient) = say(e);
            assert!(e.contains("another region than \"us-east-1\""), "{e}");
            assert!(e.contains("set region="), "{e}");
            assert!(!transient, "{e}");
        }
    }

    #[test]
    fn unreachable_endpoints_are_transient() {
        for kind in [HttpErrorKind::Connect, HttpErrorKind::Timeout] {
            let (e, transient) = say(transport(kind));
            assert!(
                e.contains("cannot reach the S3 endpoint http://127.0.0.1:9"),
                "{e}"
            );
            assert!(transient, "{e}");
        }
    }

    #[test]
    fn busy_or_failing_servers_are_transient() {
        for (status, code) in [
            ("503 Service Unavailable", "SlowDown"),
            ("500 Internal Server Error", "InternalError"),
            ("503 Service Unavailable", "ServiceUnavailable"),
            ("400 Bad Request", "RequestTimeout"),
        ] {
            let (e, transient) = say(generic(&answer(status, code)));
            assert!(e.starts_with("reading s3://b/k: "), "{e}");
            assert!(e.contains(code), "the cause keeps S3's code: {e}");
            assert!(transient, "{e}");
        }
        // A 5xx without a document (a proxy in front, or HEAD).
        let (e, transient) = say(generic(
            "Server returned non-2xx status code: 502 Bad Gateway: ",
        ));
        assert!(transient, "{e}");
        // A reset or an interrupted body.
        let (e, transient) = say(transport(HttpErrorKind::Interrupted));
        assert!(e.starts_with("reading s3://b/k: "), "{e}");
        assert!(transient, "{e}");
    }

    #[test]
    fn unknown_errors_are_transient() {
        for e in [
            generic(&answer("400 Bad Request", "SomethingNew")),
            generic("something nobody expected"),
            object_store::Error::AlreadyExists {
                path: "k".into(),
                source: answer("409 Conflict", "OperationAborted").into(),
            },
        ] {
            let (e, transient) = say(e);
            assert!(e.starts_with("reading s3://b/k: "), "{e}");
            assert!(transient, "{e}");
        }
    }

    #[test]
    fn missing_objects_are_permanent() {
        let (e, transient) = say(object_store::Error::NotFound {
            path: "k".into(),
            source: answer("404 Not Found", "NoSuchKey").into(),
        });
        assert!(!transient, "{e}");
        let (e, transient) = say(generic(&answer("404 Not Found", "NoSuchKey")));
        assert!(!transient, "{e}");
    }
}
