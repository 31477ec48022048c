//! Store URLs as users write them, and opening the store each one names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::binary_cache::BinaryCache;
use super::file::FileBlobs;
use super::local::{LocalStore, LocalStoreLayout};
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
    /// A scheme this build recognises but cannot open yet (`s3://`, `gs://`, `ssh://`).
    NotYetSupported(String),
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
                "{s:?} is not a store URL ({e}); use /nix/store, file:///DIR, s3://BUCKET, gs://BUCKET or ssh://HOST"
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
            "s3" | "gs" | "ssh" | "http" | "https" => Ok(StoreUrl::NotYetSupported(s.to_owned())),
            other => Err(invalid(format!(
                "unknown store scheme {other:?} in {s:?}; use /nix/store, file://, s3://, gs:// or ssh://"
            ))),
        }
    }

    /// Opens the store.
    pub fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            StoreUrl::Local(layout) => Ok(Arc::new(LocalStore::open(layout.clone())?)),
            StoreUrl::File { dir, create } => Ok(Arc::new(BinaryCache::new(Arc::new(FileBlobs::open(
                dir.clone(),
                *create,
            )?)))),
            StoreUrl::NotYetSupported(s) => Err(StoreError::Unsupported(format!(
                "{s}: this build of nixcached cannot open this kind of store yet; use /nix/store or file:///DIR"
            ))),
        }
    }
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
}
