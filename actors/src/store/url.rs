//! Store URLs as users write them, and opening the store each one names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::binary_cache::BinaryCache;
use super::blobs::check_key;
use super::file::FileBlobs;
use super::gcs::{GcsBlobs, GcsOptions};
use super::local::{LocalStore, LocalStoreLayout};
use super::s3::{Addressing, S3Blobs, S3Options};
use super::{Store, StoreError};

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local Nix store: `/nix/store`, any absolute store directory, a chroot root, or
    /// Nix's `local` / `local?root=DIR`.
    Local(LocalStoreLayout),
    /// `file:///DIR`: a binary cache in a folder.
    File {
        /// The folder.
        dir: PathBuf,
        /// Create the folder when missing (`?create_dir=1`, or always for upload targets).
        create: bool,
    },
    /// `ssh://[user@]host[:port][/storedir]`: a Nix store reached over ssh.
    Ssh(super::ssh::target::SshTarget),
    /// `s3://BUCKET[?…]`: a binary cache in an S3 bucket.
    S3(S3Options),
    /// `gs://BUCKET[?…]`: a binary cache in a Google Cloud Storage bucket.
    Gcs(GcsOptions),
    /// `http://` or `https://`: an upstream binary cache (such as cache.nixos.org), read-only.
    Http(url::Url),
}

fn invalid(msg: String) -> StoreError {
    StoreError::Invalid(msg)
}

impl StoreUrl {
    /// Parses what a user typed.
    pub fn parse(s: &str) -> Result<StoreUrl, StoreError> {
        if s.starts_with('/') {
            return Ok(StoreUrl::Local(LocalStoreLayout::detect(Path::new(s))?));
        }
        if s == "local" || s == "auto" || s.starts_with("local?") {
            let url = url::Url::parse(&format!(
                "local://x/{}",
                s.strip_prefix("local").unwrap_or("")
            ))
            .map_err(|e| invalid(format!("store URL {s:?}: {e}")))?;
            let mut root = None;
            for (k, v) in url.query_pairs() {
                match &*k {
                    "root" => root = Some(PathBuf::from(v.into_owned())),
                    other => {
                        return Err(invalid(format!(
                        "store URL {s:?}: unknown parameter {other:?}; local stores take root=DIR"
                    )))
                    }
                }
            }
            return Ok(StoreUrl::Local(match root {
                Some(r) if r.is_absolute() => LocalStoreLayout::chroot(&r),
                Some(r) => {
                    return Err(invalid(format!(
                        "store URL {s:?}: root {} must be absolute",
                        r.display()
                    )))
                }
                None => LocalStoreLayout::system("/nix/store")?,
            }));
        }
        let url = url::Url::parse(s).map_err(|e| {
            invalid(format!(
                "{s:?} is not a store URL ({e}); use /nix/store, file:///DIR, s3://BUCKET, gs://BUCKET, ssh://HOST or https://CACHE"
            ))
        })?;
        match url.scheme() {
            "file" => {
                if !matches!(url.host_str(), None | Some("") | Some("localhost")) {
                    return Err(invalid(format!(
                        "file URL {s:?} names host {:?}; write file:///absolute/dir",
                        url.host_str().unwrap_or_default()
                    )));
                }
                let mut create = false;
                for (k, v) in url.query_pairs() {
                    match &*k {
                        "create_dir" => create = !v.is_empty() && v != "0" && v != "false",
                        // Nix's own file:// parameters that only matter when Nix writes.
                        "compression" | "write-nar-listing" | "secret-key" | "parallel-compression"
                        | "index-debug-info" | "metadata" => {}
                        other => {
                            return Err(invalid(format!(
                                "file URL {s:?}: unknown parameter {other:?}; file:// takes create_dir=1"
                            )))
                        }
                    }
                }
                let dir = url
                    .to_file_path()
                    .map_err(|_| invalid(format!("file URL {s:?} has no usable path")))?;
                Ok(StoreUrl::File { dir, create })
            }
            "ssh" => Ok(StoreUrl::Ssh(super::ssh::target::SshTarget::parse(s)?)),
            "s3" => parse_s3(s, &url).map(StoreUrl::S3),
            "gs" => parse_gs(s, &url).map(StoreUrl::Gcs),
            "http" | "https" => {
                if url.host_str().unwrap_or_default().is_empty() {
                    return Err(invalid(format!("store URL {s:?} names no host")));
                }
                Ok(StoreUrl::Http(url))
            }
            other => Err(invalid(format!(
                "unknown store scheme {other:?} in {s:?}; use /nix/store, file://, s3://, gs://, ssh:// or https://"
            ))),
        }
    }

    /// The objects of a binary cache (`file://`, `s3://`, `gs://`), for what works on the
    /// objects themselves (`fsck`); other stores are refused with what to use instead.
    pub fn open_blobs(&self) -> Result<Arc<dyn super::blobs::Blobs>, StoreError> {
        match self {
            StoreUrl::File { dir, create } => Ok(Arc::new(FileBlobs::open(dir.clone(), *create)?)),
            StoreUrl::S3(options) => Ok(Arc::new(S3Blobs::open(options)?)),
            StoreUrl::Gcs(options) => Ok(Arc::new(GcsBlobs::open(options)?)),
            other => Err(invalid(format!(
                "{} is not a binary cache in a folder or bucket; give file:///DIR, s3://BUCKET or gs://BUCKET",
                other.scheme_name()
            ))),
        }
    }

    /// The kind of store, for messages.
    fn scheme_name(&self) -> &'static str {
        match self {
            StoreUrl::Local(_) => "a local Nix store",
            StoreUrl::File { .. } => "file://",
            StoreUrl::Ssh(_) => "an ssh:// store",
            StoreUrl::S3(_) => "s3://",
            StoreUrl::Gcs(_) => "gs://",
            StoreUrl::Http(_) => "an http(s):// cache",
        }
    }

    /// Opens the store.
    pub fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            StoreUrl::Local(layout) => Ok(Arc::new(LocalStore::open(layout.clone())?)),
            StoreUrl::File { dir, create } => Ok(Arc::new(BinaryCache::new(Arc::new(
                FileBlobs::open(dir.clone(), *create)?,
            )))),
            StoreUrl::Ssh(target) => Ok(Arc::new(super::ssh::SshStore::open(target.clone())?)),
            StoreUrl::S3(options) => Ok(Arc::new(BinaryCache::new(Arc::new(S3Blobs::open(
                options,
            )?)))),
            StoreUrl::Gcs(options) => Ok(Arc::new(BinaryCache::new(Arc::new(GcsBlobs::open(
                options,
            )?)))),
            StoreUrl::Http(url) => Ok(Arc::new(super::upstream::UpstreamStore::open(
                super::upstream::UpstreamOptions::new(vec![url.clone()]),
            )?)),
        }
    }
}

/// Parameters of Nix's binary-cache stores that only matter when Nix itself writes; accepted
/// (and ignored) so URLs copied from a Nix configuration keep working.
const NIX_WRITER_PARAMS: &[&str] = &[
    "compression",
    "compression-level",
    "write-nar-listing",
    "secret-key",
    "parallel-compression",
    "index-debug-info",
    "narinfo-compression",
    "ls-compression",
    "log-compression",
    "multipart-upload",
    "multipart-chunk-size",
    "multipart-threshold",
    "buffer-size",
    "want-mass-query",
    "priority",
    "trusted",
];

/// What `s3://` URLs take, for error messages.
const S3_PARAMS: &str = "region, endpoint, profile, prefix, scheme=http|https, \
     addressing-style=path|virtual|auto, disableSSL=true, s3ForcePathStyle=true, \
     stall-timeout=SECONDS (and Nix's writer settings such as compression, which only matter to Nix)";

/// What `gs://` URLs take, for error messages.
const GS_PARAMS: &str = "prefix, endpoint, stall-timeout=SECONDS";

/// The bucket of `s3://BUCKET` or `gs://BUCKET`; the path must be empty (keys go under
/// `prefix=`, never under a path that gocloud and Nix both ignore).
fn bucket_of(s: &str, url: &url::Url) -> Result<String, StoreError> {
    let scheme = url.scheme();
    let bucket = url.host_str().unwrap_or_default();
    if bucket.is_empty() {
        return Err(invalid(format!(
            "store URL {s:?} names no bucket; write {scheme}://BUCKET"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
        return Err(invalid(format!(
            "store URL {s:?}: a bucket takes no user, password or port; write {scheme}://BUCKET?endpoint=… for another server"
        )));
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(format!(
            "store URL {s:?}: {bucket:?} is not a valid bucket name"
        )));
    }
    if !matches!(url.path(), "" | "/") {
        return Err(invalid(format!(
            "store URL {s:?} has a path; write {scheme}://{bucket}?prefix={} to keep the cache under it",
            url.path().trim_matches('/')
        )));
    }
    if url.fragment().is_some() {
        return Err(invalid(format!("store URL {s:?} has a #fragment")));
    }
    Ok(bucket.to_owned())
}

/// `prefix=a/b/` → `a/b`: keys go under that folder whichever way it is written.
fn prefix_param(s: &str, v: &str) -> Result<String, StoreError> {
    let p = v.trim_matches('/');
    if !p.is_empty() {
        check_key(p).map_err(|_| {
            invalid(format!(
                "store URL {s:?}: prefix {v:?} must be a relative folder without empty, '.' or '..' parts"
            ))
        })?;
    }
    Ok(p.to_owned())
}

/// `stall-timeout=SECONDS`: how long a connection to a bucket may sit with no byte moving
/// before the request is abandoned and retried (default 60 s).
fn stall_timeout_param(s: &str, v: &str) -> Result<std::time::Duration, StoreError> {
    match v.parse::<u64>() {
        Ok(n @ 1..=3600) => Ok(std::time::Duration::from_secs(n)),
        _ => Err(invalid(format!(
            "store URL {s:?}: stall-timeout={v:?} must be a whole number of seconds from 1 to 3600"
        ))),
    }
}

fn bool_param(s: &str, k: &str, v: &str) -> Result<bool, StoreError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(invalid(format!(
            "store URL {s:?}: {k}={v:?} must be true or false"
        ))),
    }
}

/// Reads the dialects of `s3://` URLs: nixcached's own (`region`, `endpoint` as a URL,
/// `profile`, `prefix`), its old README's (`endpoint=host:port`, `disableSSL`,
/// `s3ForcePathStyle`) and Nix's (`scheme`, `addressing-style`).
fn parse_s3(s: &str, url: &url::Url) -> Result<S3Options, StoreError> {
    let mut o = S3Options {
        bucket: bucket_of(s, url)?,
        ..S3Options::default()
    };
    let mut endpoint = None;
    let mut scheme: Option<String> = None;
    let mut disable_ssl = None;
    let mut force_path = None;
    let mut style = None;
    for (k, v) in url.query_pairs() {
        match &*k {
            "region" => o.region = Some(v.into_owned()).filter(|r| !r.is_empty()),
            "endpoint" => endpoint = Some(v.into_owned()).filter(|e| !e.is_empty()),
            "profile" => o.profile = Some(v.into_owned()).filter(|p| !p.is_empty()),
            "prefix" => o.prefix = prefix_param(s, &v)?,
            "stall-timeout" => o.stall_timeout = Some(stall_timeout_param(s, &v)?),
            "scheme" => match &*v {
                "http" | "https" => scheme = Some(v.into_owned()),
                _ => {
                    return Err(invalid(format!(
                        "store URL {s:?}: scheme={v:?} must be http or https"
                    )))
                }
            },
            "disableSSL" => disable_ssl = Some(bool_param(s, &k, &v)?),
            "s3ForcePathStyle" => force_path = Some(bool_param(s, &k, &v)?),
            "addressing-style" => {
                style = Some(match &*v {
                    "path" => Addressing::Path,
                    "virtual" => Addressing::Virtual,
                    "auto" => Addressing::Auto,
                    _ => {
                        return Err(invalid(format!(
                            "store URL {s:?}: addressing-style={v:?} must be path, virtual or auto"
                        )))
                    }
                })
            }
            // gocloud's SDK selector; there is one SDK here.
            "awssdk" => {}
            k if NIX_WRITER_PARAMS.contains(&k) => {}
            other => {
                return Err(invalid(format!(
                    "store URL {s:?}: unknown parameter {other:?}; s3:// takes {S3_PARAMS}"
                )))
            }
        }
    }

    // Plain HTTP can be asked for three ways; they must not contradict each other.
    let wants_http = match (scheme.as_deref(), disable_ssl) {
        (Some("http"), Some(false)) | (Some("https"), Some(true)) => {
            return Err(invalid(format!(
                "store URL {s:?}: scheme and disableSSL contradict each other"
            )))
        }
        (Some(sch), _) => Some(sch == "http"),
        (None, d) => d,
    };
    o.endpoint = match endpoint {
        None => {
            o.plain_http = wants_http == Some(true);
            None
        }
        Some(e) if e.contains("://") => {
            let u = url::Url::parse(&e)
                .map_err(|err| invalid(format!("store URL {s:?}: endpoint {e:?}: {err}")))?;
            let http = match u.scheme() {
                "http" => true,
                "https" => false,
                other => {
                    return Err(invalid(format!(
                        "store URL {s:?}: endpoint scheme {other:?} must be http or https"
                    )))
                }
            };
            if wants_http.is_some_and(|w| w != http) {
                return Err(invalid(format!(
                    "store URL {s:?}: endpoint {e:?} contradicts scheme/disableSSL"
                )));
            }
            if u.host_str().is_none() || u.query().is_some() {
                return Err(invalid(format!(
                    "store URL {s:?}: endpoint {e:?} must be scheme://host[:port]"
                )));
            }
            Some(e.trim_end_matches('/').to_owned())
        }
        Some(e) => {
            let sch = if wants_http == Some(true) {
                "http"
            } else {
                "https"
            };
            let full = format!("{sch}://{}", e.trim_end_matches('/'));
            url::Url::parse(&full)
                .ok()
                .filter(|u| u.host_str().is_some() && u.query().is_none())
                .ok_or_else(|| {
                    invalid(format!(
                        "store URL {s:?}: endpoint {e:?} must be host[:port] or a URL"
                    ))
                })?;
            Some(full)
        }
    };
    o.addressing = match (style, force_path) {
        (Some(Addressing::Virtual), Some(true)) => {
            return Err(invalid(format!(
                "store URL {s:?}: addressing-style=virtual contradicts s3ForcePathStyle=true"
            )))
        }
        (Some(st), _) => st,
        (None, Some(true)) => Addressing::Path,
        (None, _) => Addressing::Auto,
    };
    Ok(o)
}

/// Reads `gs://BUCKET[?prefix=…&endpoint=…]`; gocloud's URL-signing parameters are accepted
/// and ignored, since nothing here signs URLs.
fn parse_gs(s: &str, url: &url::Url) -> Result<GcsOptions, StoreError> {
    let mut o = GcsOptions {
        bucket: bucket_of(s, url)?,
        ..GcsOptions::default()
    };
    for (k, v) in url.query_pairs() {
        match &*k {
            "prefix" => o.prefix = prefix_param(s, &v)?,
            "endpoint" => o.endpoint = Some(v.into_owned()).filter(|e| !e.is_empty()),
            "stall-timeout" => o.stall_timeout = Some(stall_timeout_param(s, &v)?),
            "access_id" | "private_key_path" => {}
            other => {
                return Err(invalid(format!(
                    "store URL {s:?}: unknown parameter {other:?}; gs:// takes {GS_PARAMS}"
                )))
            }
        }
    }
    if let Some(e) = &o.endpoint {
        super::gcs::Endpoint::resolve(Some(e), None)
            .map_err(|err| invalid(format!("store URL {s:?}: {err}")))?;
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert!(matches!(
            StoreUrl::parse("file:///srv/cache?create_dir=1").unwrap(),
            StoreUrl::File { create: true, .. }
        ));
        assert_eq!(
            StoreUrl::parse("local?root=/tmp/x").unwrap(),
            StoreUrl::Local(LocalStoreLayout::chroot(Path::new("/tmp/x")))
        );
        assert!(StoreUrl::parse("file:///srv?bogus=1").is_err());
        assert!(StoreUrl::parse("file://remote/srv").is_err());
        assert!(StoreUrl::parse("ftp://x").is_err());
        assert!(StoreUrl::parse("relative/dir").is_err());
        assert!(StoreUrl::parse("local?root=rel").is_err());
    }

    fn s3(s: &str) -> S3Options {
        match StoreUrl::parse(s) {
            Ok(StoreUrl::S3(o)) => o,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn gs(s: &str) -> GcsOptions {
        match StoreUrl::parse(s) {
            Ok(StoreUrl::Gcs(o)) => o,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn err(s: &str) -> String {
        match StoreUrl::parse(s) {
            Err(e) => e.to_string(),
            Ok(u) => panic!("{s} parsed as {u:?}"),
        }
    }

    #[test]
    fn s3_plain_bucket() {
        assert_eq!(
            s3("s3://cache"),
            S3Options {
                bucket: "cache".into(),
                ..S3Options::default()
            }
        );
        assert_eq!(s3("s3://my.cache/").bucket, "my.cache");
    }

    #[test]
    fn s3_nixcached_dialect() {
        let o = s3("s3://cache?region=eu-west-1&endpoint=http://127.0.0.1:9000/&profile=work&prefix=/nix/cache/&awssdk=v2");
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(o.profile.as_deref(), Some("work"));
        assert_eq!(o.prefix, "nix/cache");
        assert_eq!(o.addressing, Addressing::Auto);
        assert!(!o.plain_http);
        assert_eq!(
            s3("s3://c?endpoint=https%3A%2F%2Fminio.example.com")
                .endpoint
                .as_deref(),
            Some("https://minio.example.com")
        );
    }

    #[test]
    fn s3_readme_dialect() {
        let o = s3("s3://cache?endpoint=minio:9000&disableSSL=true&s3ForcePathStyle=true");
        assert_eq!(o.endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(o.addressing, Addressing::Path);
        let o = s3("s3://cache?endpoint=minio.example.com:9000");
        assert_eq!(
            o.endpoint.as_deref(),
            Some("https://minio.example.com:9000")
        );
        assert_eq!(
            s3("s3://c?endpoint=h:1&disableSSL=false")
                .endpoint
                .as_deref(),
            Some("https://h:1")
        );
        assert_eq!(
            s3("s3://c?s3ForcePathStyle=false").addressing,
            Addressing::Auto
        );
    }

    #[test]
    fn s3_nix_dialect() {
        let o = s3("s3://cache?endpoint=127.0.0.1:15000&scheme=http&region=us-east-1&addressing-style=path");
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:15000"));
        assert_eq!(o.addressing, Addressing::Path);
        assert_eq!(
            s3("s3://c?addressing-style=virtual").addressing,
            Addressing::Virtual
        );
        assert_eq!(
            s3("s3://c?addressing-style=auto").addressing,
            Addressing::Auto
        );
        let o = s3("s3://c?scheme=http");
        assert!(o.plain_http);
        assert_eq!(o.endpoint, None);
        // Nix's writer settings are accepted and have no effect here.
        let o =
            s3("s3://c?compression=zstd&write-nar-listing=1&secret-key=/k&multipart-upload=true");
        assert_eq!(o, s3("s3://c"));
    }

    #[test]
    fn s3_rejections() {
        let e = err("s3://cache?bogus=1");
        assert!(e.contains("\"bogus\""), "{e}");
        assert!(e.contains("region, endpoint, profile, prefix"), "{e}");
        assert!(err("s3://?region=x").contains("no bucket"));
        assert!(err("s3://cache/sub/dir").contains("prefix=sub/dir"));
        assert!(err("s3://user@cache").contains("no user"));
        assert!(err("s3://cache:9000").contains("port"));
        assert!(err("s3://cache?scheme=ftp").contains("http or https"));
        assert!(err("s3://cache?addressing-style=weird").contains("path, virtual or auto"));
        assert!(err("s3://cache?disableSSL=maybe").contains("true or false"));
        assert!(err("s3://cache?scheme=https&disableSSL=true").contains("contradict"));
        assert!(err("s3://cache?endpoint=https://h&scheme=http").contains("contradicts"));
        assert!(err("s3://cache?endpoint=ftp://h").contains("http or https"));
        assert!(
            err("s3://cache?addressing-style=virtual&s3ForcePathStyle=true")
                .contains("contradicts")
        );
        assert!(err("s3://cache?prefix=a/../b").contains("prefix"));
        assert!(err("s3://ca$he").contains("bucket"));
        assert!(err("s3://cache?key=x").contains("\"key\""));
    }

    #[test]
    fn stall_timeout_is_whole_seconds_on_both_buckets() {
        use std::time::Duration;
        assert_eq!(
            s3("s3://c?stall-timeout=5").stall_timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            gs("gs://c?stall-timeout=3600").stall_timeout,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(s3("s3://c").stall_timeout, None);
        for bad in ["0", "3601", "1.5", "5s", "", "-1"] {
            for scheme in ["s3", "gs"] {
                let e = err(&format!("{scheme}://c?stall-timeout={bad}"));
                assert!(e.contains("whole number of seconds"), "{e}");
            }
        }
    }

    #[test]
    fn gs_dialects() {
        assert_eq!(
            gs("gs://cache"),
            GcsOptions {
                bucket: "cache".into(),
                ..GcsOptions::default()
            }
        );
        let o = gs("gs://cache?prefix=a/b/&endpoint=http://127.0.0.1:4443");
        assert_eq!(o.prefix, "a/b");
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
        assert_eq!(
            gs("gs://cache?endpoint=localhost:4443").endpoint.as_deref(),
            Some("localhost:4443")
        );
        // gocloud's URL-signing parameters: accepted, unused.
        assert_eq!(
            gs("gs://cache?access_id=x&private_key_path=/k"),
            gs("gs://cache")
        );
    }

    #[test]
    fn gs_rejections() {
        let e = err("gs://cache?region=x");
        assert!(
            e.contains("\"region\"") && e.contains("prefix, endpoint"),
            "{e}"
        );
        assert!(err("gs://cache?endpoint=ftp://x").contains("endpoint"));
        assert!(err("gs://cache/path").contains("prefix=path"));
        assert!(err("gs://").contains("no bucket"));
        assert!(err("gs://cache?prefix=..").contains("prefix"));
    }

    #[test]
    fn other_schemes() {
        assert!(matches!(
            StoreUrl::parse("https://cache.nixos.org").unwrap(),
            StoreUrl::Http(u) if u.as_str() == "https://cache.nixos.org/"
        ));
        assert!(StoreUrl::parse("ftp://x").is_err());
    }
}
