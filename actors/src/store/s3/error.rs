//! Turning `object_store` errors into [`StoreError`]s that say what to do.

use object_store::client::{HttpError, HttpErrorKind};

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

impl Target {
    /// The error for a bucket that S3 said does not exist.
    pub(super) fn no_bucket(&self, e: object_store::Error) -> StoreError {
        StoreError::backend(
            format!(
                "S3 bucket {:?} does not exist at {} (create it, or check the s3:// URL's bucket, region and endpoint)",
                self.bucket, self.endpoint
            ),
            e,
        )
    }

    /// Turns an `object_store` error from `doing` (reading, writing...) `what` (an `s3://`
    /// URL) into what a user can act on.
    pub(super) fn classify(&self, doing: &str, what: &str, e: object_store::Error) -> StoreError {
        let text = e.to_string();
        match &e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                let why = if [
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "ExpiredToken",
                    "InvalidToken",
                    "TokenRefreshRequired",
                ]
                .iter()
                .any(|code| text.contains(code))
                {
                    "S3 refused the credentials"
                } else {
                    "S3 denied access (the credentials lack permission, or the bucket belongs to someone else)"
                };
                return StoreError::backend(format!("{doing} {what}: {why}"), e);
            }
            _ => {}
        }
        // Requests to the credential endpoints fail when the chain reached its end without
        // finding credentials anywhere else.
        if text.contains("169.254.169.254") || text.contains("169.254.170.2") {
            return StoreError::backend(
                format!(
                    "{doing} {what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, add profile= or a default profile in ~/.aws, or run \
                     where the instance or container metadata service provides a role)"
                ),
                e,
            );
        }
        if let Some(kind) = http_error_kind(&e) {
            if matches!(kind, HttpErrorKind::Connect | HttpErrorKind::Timeout) {
                return StoreError::backend(
                    format!(
                        "{doing} {what}: cannot reach the S3 endpoint {}",
                        self.endpoint
                    ),
                    e,
                );
            }
        }
        if text.contains("PermanentRedirect")
            || text.contains("AuthorizationHeaderMalformed")
            || text.contains("incorrectly configured region")
        {
            return StoreError::backend(
                format!(
                    "{doing} {what}: the bucket is in another region than {:?}; set region= in the s3:// URL",
                    self.region
                ),
                e,
            );
        }
        StoreError::backend(format!("{doing} {what}"), e)
    }
}

/// S3 said the bucket does not exist. Listings report it in an error that `object_store`
/// does not classify, so the code in the body decides.
pub(super) fn is_no_bucket(e: &object_store::Error) -> bool {
    e.to_string().contains("NoSuchBucket")
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
    use super::*;

    #[test]
    fn errors_name_their_cause() {
        let b = Target {
            bucket: "b".into(),
            endpoint: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
        };
        let denied = |body: &str| object_store::Error::PermissionDenied {
            path: "k".into(),
            source: body.to_owned().into(),
        };
        let generic = |body: &str| object_store::Error::Generic {
            store: "S3",
            source: body.to_owned().into(),
        };
        let say = |e| b.classify("reading", "s3://b/k", e).to_string();
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
}
