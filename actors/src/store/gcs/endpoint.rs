//! Where a bucket is: the store URL's options, the endpoint requests go to, and the JSON API's
//! URLs for the bucket's objects.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::GcsBlobs;
use crate::store::{Result, StoreError};

/// Google's endpoint, when no other is given.
const GOOGLE: &str = "https://storage.googleapis.com";

/// Characters left as they are in a path segment; GCS wants everything else encoded,
/// including `/` inside object names.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Where a GCS bucket is, as a store URL says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcsOptions {
    /// The bucket name.
    pub bucket: String,
    /// Key prefix every object lives under, without leading or trailing `/` (empty: the root).
    pub prefix: String,
    /// The `endpoint=` parameter as written: a URL, or `host:port` for plain HTTP.
    pub endpoint: Option<String>,
    /// How long a connection may move no byte before a request is abandoned (and retried);
    /// `None` for the default, 60 s.
    pub stall_timeout: Option<std::time::Duration>,
}

impl GcsOptions {
    /// `gs://bucket/prefix`, for logs and messages.
    pub fn describe(&self) -> String {
        let mut s = format!("gs://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(ep) = &self.endpoint {
            s.push_str(&format!(" (endpoint {ep})"));
        }
        s
    }
}

/// Where requests go, and whether they carry Google credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]`, no trailing slash.
    pub base: String,
    /// Send OAuth tokens. Emulators get none, and neither does plain HTTP, which would leak
    /// them.
    pub authenticated: bool,
}

impl Endpoint {
    /// Picks the endpoint from the URL's `endpoint=` and the `STORAGE_EMULATOR_HOST`
    /// environment variable (the convention of Google's own client libraries), in that order.
    pub fn resolve(param: Option<&str>, emulator_host: Option<&str>) -> Result<Endpoint> {
        let (raw, emulator) = match (param, emulator_host.filter(|h| !h.is_empty())) {
            (Some(p), _) => (p, false),
            (None, Some(e)) => (e, true),
            (None, None) => {
                return Ok(Endpoint {
                    base: GOOGLE.into(),
                    authenticated: true,
                })
            }
        };
        let with_scheme = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}")
        };
        let url = url::Url::parse(&with_scheme)
            .map_err(|e| StoreError::Invalid(format!("GCS endpoint {raw:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || url.query().is_some()
            || !matches!(url.path(), "" | "/")
        {
            return Err(StoreError::Invalid(format!(
                "GCS endpoint {raw:?} must be http(s)://host[:port] or host:port"
            )));
        }
        Ok(Endpoint {
            base: with_scheme.trim_end_matches('/').to_owned(),
            authenticated: !emulator && url.scheme() == "https",
        })
    }
}

impl GcsBlobs {
    fn bucket_url(&self) -> String {
        format!(
            "{}/storage/v1/b/{}/o",
            self.endpoint.base,
            utf8_percent_encode(&self.options.bucket, SEGMENT)
        )
    }

    /// The bucket's object listing with query parameters, encoded.
    pub(super) fn list_url(&self, query: &[(&str, &str)]) -> String {
        let mut url = url::Url::parse(&self.bucket_url()).expect("the endpoint was validated");
        url.query_pairs_mut().extend_pairs(query);
        url.into()
    }

    pub(super) fn object_url(&self, name: &str) -> String {
        format!(
            "{}/{}",
            self.bucket_url(),
            utf8_percent_encode(name, SEGMENT)
        )
    }

    pub(super) fn upload_url(&self, kind: &str, name: &str) -> String {
        let mut url = url::Url::parse(&format!(
            "{}/upload/storage/v1/b/{}/o",
            self.endpoint.base,
            utf8_percent_encode(&self.options.bucket, SEGMENT)
        ))
        .expect("the endpoint was validated");
        url.query_pairs_mut()
            .append_pair("uploadType", kind)
            .append_pair("name", name);
        url.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let google = Endpoint::resolve(None, None).unwrap();
        assert_eq!(google.base, GOOGLE);
        assert!(google.authenticated);
        let emu = Endpoint::resolve(None, Some("localhost:4443")).unwrap();
        assert_eq!(emu.base, "http://localhost:4443");
        assert!(!emu.authenticated);
        let emu = Endpoint::resolve(None, Some("https://emu:4443/")).unwrap();
        assert_eq!(emu.base, "https://emu:4443");
        assert!(!emu.authenticated, "an emulator never gets tokens");
        let param = Endpoint::resolve(Some("http://127.0.0.1:9"), Some("other:1")).unwrap();
        assert_eq!(param.base, "http://127.0.0.1:9", "the URL wins");
        assert!(!param.authenticated);
        let private = Endpoint::resolve(Some("https://storage.example.com"), None).unwrap();
        assert!(private.authenticated);
        assert!(Endpoint::resolve(Some("ftp://x"), None).is_err());
        assert!(Endpoint::resolve(Some("http://x/path"), None).is_err());
        assert!(Endpoint::resolve(Some("http://"), None).is_err());
    }

    #[test]
    fn object_names_are_one_encoded_segment() {
        assert_eq!(
            utf8_percent_encode("nar/a+b=c~d.nar", SEGMENT).to_string(),
            "nar%2Fa%2Bb%3Dc~d.nar"
        );
    }
}
