//! Store paths (`/nix/store/<digest>-<name>`) and the store directory they live in.

use std::fmt;

use thiserror::Error;

use super::nixbase32;

/// Length of a store-path digest in nixbase32 characters (160 bits).
pub const DIGEST_LEN: usize = 32;

/// Longest name Nix accepts after the digest.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    /// Not under the expected store directory.
    #[error("{path:?} is not inside the store directory {store_dir}")]
    NotInStore {
        /// The path given.
        path: String,
        /// The store directory expected.
        store_dir: String,
    },
    /// Points inside a store object (`/nix/store/x-y/bin/z`) where a store object was expected.
    #[error("{0:?} names a file inside a store object; give the store object itself")]
    SubPath(String),
    /// The digest part is malformed.
    #[error("{0:?} does not start with a 32-character nixbase32 digest followed by '-'")]
    BadDigest(String),
    /// The name part is malformed.
    #[error("store path name {0:?} is invalid: names are 1-211 characters of A-Z a-z 0-9 + - . _ ? = and do not start with '.'")]
    BadName(String),
    /// The store directory is not an absolute clean path.
    #[error("store directory {0:?} must be an absolute path without a trailing slash, trailing whitespace or control characters")]
    BadStoreDir(String),
}

/// The directory holding store objects (usually `/nix/store`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".into())
    }
}

impl StoreDir {
    /// Validates and wraps a directory; a trailing slash is removed.
    pub fn new(dir: &str) -> Result<StoreDir, StorePathError> {
        let trimmed = if dir.len() > 1 {
            dir.trim_end_matches('/')
        } else {
            dir
        };
        // Whitespace at either end would not survive the `Key: value` files that carry the
        // directory (nix-cache-info, narinfo), which trim it; control characters would break
        // their lines.
        if !trimmed.starts_with('/')
            || trimmed.len() < 2
            || trimmed.contains("//")
            || trimmed.ends_with(char::is_whitespace)
            || trimmed.contains(char::is_control)
        {
            return Err(StorePathError::BadStoreDir(dir.into()));
        }
        if trimmed.split('/').any(|c| c == "." || c == "..") {
            return Err(StorePathError::BadStoreDir(dir.into()));
        }
        Ok(StoreDir(trimmed.into()))
    }

    /// The directory as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an absolute path that must name a store object directly in this directory.
    pub fn parse_path(&self, path: &str) -> Result<StorePath, StorePathError> {
        let rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.into(),
                store_dir: self.0.clone(),
            })?;
        if rest.contains('/') {
            return Err(StorePathError::SubPath(path.into()));
        }
        StorePath::from_base_name(rest)
    }

    /// The absolute path of a store object.
    pub fn display(&self, p: &StorePath) -> String {
        format!("{}/{}", self.0, p)
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A store-path digest: the 32 nixbase32 characters that name `<digest>.narinfo`.
///
/// Parsed once where a digest enters (a request path, a FIFO line, a listing) and carried as
/// this type from then on, so no backend has to re-check a string before it builds a key or a
/// file name out of it: a `Digest` cannot hold `/`, `..` or anything but nixbase32.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; DIGEST_LEN]);

/// Why a string is not a store-path digest.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0:?} is not a 32-character nixbase32 store-path digest")]
pub struct BadDigest(pub String);

impl Digest {
    /// Parses a digest; the whole string must be the 32 characters.
    pub fn parse(s: &str) -> Result<Digest, BadDigest> {
        if !is_valid_digest(s) {
            let shown: String = s.chars().take(80).collect();
            return Err(BadDigest(shown));
        }
        let mut bytes = [0u8; DIGEST_LEN];
        bytes.copy_from_slice(s.as_bytes());
        Ok(Digest(bytes))
    }

    /// The digest as text.
    pub fn as_str(&self) -> &str {
        // Only nixbase32 (ASCII) bytes ever get in, through `parse`.
        std::str::from_utf8(&self.0).expect("a digest is ASCII")
    }
}

impl std::ops::Deref for Digest {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Digest {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::str::FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Digest, BadDigest> {
        Digest::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.as_str())
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A store object's identity: its digest and name, independent of the store directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    digest: Digest,
    name: String,
}

/// True for a valid store-path name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

/// True when `s` is a 32-character nixbase32 store-path digest.
pub fn is_valid_digest(s: &str) -> bool {
    s.len() == DIGEST_LEN && nixbase32::is_valid(s.as_bytes())
}

impl StorePath {
    /// Parses `<digest>-<name>`, the last component of a store path.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let (digest, name) = match (base.get(..DIGEST_LEN), base.get(DIGEST_LEN..)) {
            (Some(d), Some(rest)) if rest.starts_with('-') && is_valid_digest(d) => (d, &rest[1..]),
            _ => return Err(StorePathError::BadDigest(base.into())),
        };
        if !is_valid_name(name) {
            return Err(StorePathError::BadName(name.into()));
        }
        Ok(StorePath {
            digest: Digest::parse(digest).map_err(|_| StorePathError::BadDigest(base.into()))?,
            name: name.into(),
        })
    }

    /// The 32-character digest (what `<digest>.narinfo` is named after).
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True for derivation files.
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    /// The base name `<digest>-<name>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.digest, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/wxbdhil717xasnf3c4lq7p5q6npm3cid-testapp";

    #[test]
    fn parses_and_prints() {
        let dir = StoreDir::default();
        let p = dir.parse_path(P).unwrap();
        assert_eq!(p.digest(), "wxbdhil717xasnf3c4lq7p5q6npm3cid");
        assert_eq!(p.name(), "testapp");
        assert_eq!(dir.display(&p), P);
    }

    #[test]
    fn rejects_what_nix_rejects() {
        let dir = StoreDir::default();
        assert!(matches!(
            dir.parse_path("/tmp/x"),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(matches!(
            dir.parse_path(&format!("{P}/bin")),
            Err(StorePathError::SubPath(_))
        ));
        assert!(matches!(
            dir.parse_path("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x"),
            Err(StorePathError::BadDigest(_))
        ));
        assert!(matches!(
            dir.parse_path("/nix/store/wxbdhil717xasnf3c4lq7p5q6npm3cid-.hidden"),
            Err(StorePathError::BadName(_))
        ));
        assert!(matches!(
            dir.parse_path("/nix/store/wxbdhil717xasnf3c4lq7p5q6npm3cid-a b"),
            Err(StorePathError::BadName(_))
        ));
        assert!(dir.parse_path("/nix/store/../etc/passwd").is_err());
        assert!(StoreDir::new("relative").is_err());
        // Found by fuzzing (cache_info target): "/a: /" became "/a: ", which nix-cache-info
        // rendered and read back as "/a:".
        assert!(StoreDir::new("/a: /").is_err());
        assert!(StoreDir::new("/a\n/b").is_err());
        assert!(StoreDir::new("/a b/c").is_ok());
        assert_eq!(StoreDir::new("/nix/store/").unwrap().as_str(), "/nix/store");
    }
}
