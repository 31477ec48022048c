//! The code in S3's XML error document (`<Error><Code>NoSuchBucket</Code>...`), which says
//! more precisely than the HTTP status what went wrong.

use std::fmt;

/// The `<Code>` of an S3 error document: the codes nixcached tells apart, and the rest.
///
/// <https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html#ErrorCodeList>
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum S3ErrorCode {
    /// The bucket does not exist.
    NoSuchBucket,
    /// The object does not exist.
    NoSuchKey,
    /// The credentials are valid but not allowed to do this.
    AccessDenied,
    /// The access key is unknown to S3.
    InvalidAccessKeyId,
    /// The secret key does not match the access key.
    SignatureDoesNotMatch,
    /// The session token has expired.
    ExpiredToken,
    /// The session token is malformed or invalid.
    InvalidToken,
    /// The session token must be refreshed.
    TokenRefreshRequired,
    /// The bucket is in another region (or at another endpoint).
    PermanentRedirect,
    /// The request was signed for another region than the bucket's.
    AuthorizationHeaderMalformed,
    /// S3 asks for fewer requests.
    SlowDown,
    /// S3 failed internally.
    InternalError,
    /// S3 cannot answer now.
    ServiceUnavailable,
    /// The connection was idle too long while S3 waited for the request.
    RequestTimeout,
    /// Any other code, as S3 spelled it.
    Other(String),
}

impl S3ErrorCode {
    /// The code for S3's spelling of it.
    fn parse(code: &str) -> S3ErrorCode {
        match code {
            "NoSuchBucket" => S3ErrorCode::NoSuchBucket,
            "NoSuchKey" => S3ErrorCode::NoSuchKey,
            "AccessDenied" => S3ErrorCode::AccessDenied,
            "InvalidAccessKeyId" => S3ErrorCode::InvalidAccessKeyId,
            "SignatureDoesNotMatch" => S3ErrorCode::SignatureDoesNotMatch,
            "ExpiredToken" => S3ErrorCode::ExpiredToken,
            "InvalidToken" => S3ErrorCode::InvalidToken,
            "TokenRefreshRequired" => S3ErrorCode::TokenRefreshRequired,
            "PermanentRedirect" => S3ErrorCode::PermanentRedirect,
            "AuthorizationHeaderMalformed" => S3ErrorCode::AuthorizationHeaderMalformed,
            "SlowDown" => S3ErrorCode::SlowDown,
            "InternalError" => S3ErrorCode::InternalError,
            "ServiceUnavailable" => S3ErrorCode::ServiceUnavailable,
            "RequestTimeout" => S3ErrorCode::RequestTimeout,
            other => S3ErrorCode::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for S3ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known = match self {
            S3ErrorCode::NoSuchBucket => "NoSuchBucket",
            S3ErrorCode::NoSuchKey => "NoSuchKey",
            S3ErrorCode::AccessDenied => "AccessDenied",
            S3ErrorCode::InvalidAccessKeyId => "InvalidAccessKeyId",
            S3ErrorCode::SignatureDoesNotMatch => "SignatureDoesNotMatch",
            S3ErrorCode::ExpiredToken => "ExpiredToken",
            S3ErrorCode::InvalidToken => "InvalidToken",
            S3ErrorCode::TokenRefreshRequired => "TokenRefreshRequired",
            S3ErrorCode::PermanentRedirect => "PermanentRedirect",
            S3ErrorCode::AuthorizationHeaderMalformed => "AuthorizationHeaderMalformed",
            S3ErrorCode::SlowDown => "SlowDown",
            S3ErrorCode::InternalError => "InternalError",
            S3ErrorCode::ServiceUnavailable => "ServiceUnavailable",
            S3ErrorCode::RequestTimeout => "RequestTimeout",
            S3ErrorCode::Other(code) => code,
        };
        f.write_str(known)
    }
}

/// The code of the S3 error document an error carries, if any.
///
/// `object_store` 0.14 keeps the response's status and body in `RetryError`, which lives in
/// a crate-private module: it cannot be named, so it cannot be downcast to, and no public
/// accessor returns the status or the body. What stays visible is the error's `Display`
/// text, which ends with the body. This is the one function that reads that text, and it
/// reads one thing, the `<Code>` element.
///
/// One case has no body to read: S3 answers a request for a bucket in another region with a
/// redirect that has no `Location` header (and no body for `HEAD`), which `object_store`
/// reports with a fixed message (`RequestError::BareRedirect`, equally private). That message
/// is taken as the `PermanentRedirect` it stands for.
pub(super) fn s3_error_code(e: &object_store::Error) -> Option<S3ErrorCode> {
    /// `object_store`'s text for `RequestError::BareRedirect`.
    const BARE_REDIRECT: &str = "Received redirect without LOCATION";
    let text = e.to_string();
    let code = text
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.trim())
        .filter(|code| !code.is_empty());
    match code {
        Some(code) => Some(S3ErrorCode::parse(code)),
        None if text.contains(BARE_REDIRECT) => Some(S3ErrorCode::PermanentRedirect),
        None => None,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The text `object_store` gives an S3 error response: the request, the status, then
    /// S3's XML error document.
    pub(in crate::store::s3) fn answer(status: &str, code: &str) -> String {
        format!(
            "Error performing GET http://127.0.0.1:9/b/k in 3ms - Server returned non-2xx status \
             code: {status}: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
             <Message>We could not do that.</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>"
        )
    }

    /// An error `object_store` leaves unclassified, with this text as its cause.
    fn generic(body: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: body.to_owned().into(),
        }
    }

    #[test]
    fn codes_come_from_the_error_document() {
        let code = |text: &str| s3_error_code(&generic(text));
        assert_eq!(
            code(&answer("404 Not Found", "NoSuchBucket")),
            Some(S3ErrorCode::NoSuchBucket)
        );
        assert_eq!(
            code(&answer("400 Bad Request", " SlowDown\n")),
            Some(S3ErrorCode::SlowDown)
        );
        assert_eq!(
            code(&answer("400 Bad Request", "InvalidArgument")),
            Some(S3ErrorCode::Other("InvalidArgument".into()))
        );
        assert_eq!(code(&answer("400 Bad Request", "")), None);
        assert_eq!(code("<Code>NoSuchBucket"), None, "an unclosed element");
        assert_eq!(
            code("Server returned non-2xx status code: 404 Not Found: "),
            None
        );
        assert_eq!(
            code("Received redirect without LOCATION, this normally indicates an incorrectly configured region"),
            Some(S3ErrorCode::PermanentRedirect)
        );
        for name in [
            "NoSuchKey",
            "ExpiredToken",
            "RequestTimeout",
            "InvalidArgument",
        ] {
            assert_eq!(S3ErrorCode::parse(name).to_string(), name);
        }
    }
}
