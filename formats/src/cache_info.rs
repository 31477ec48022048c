//! `nix-cache-info`, the file at the root of every binary cache.

use thiserror::Error;

use super::store_path::{StoreDir, StorePathError};

/// The parsed `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheInfo {
    /// The store directory the cache's paths belong to.
    pub store_dir: StoreDir,
    /// Whether clients may query many paths at once.
    pub want_mass_query: bool,
    /// Substituter priority (lower is preferred); absent when the cache does not say.
    pub priority: Option<u32>,
}

/// Why a `nix-cache-info` was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CacheInfoError {
    /// Longer than [`MAX_CACHE_INFO_BYTES`].
    #[error("nix-cache-info is {0} bytes, more than the {MAX_CACHE_INFO_BYTES} a real one ever takes; check the cache's nix-cache-info file")]
    TooLarge(usize),
    /// A line without `:`.
    #[error("nix-cache-info line {0} has no ':'; lines look like 'StoreDir: /nix/store'")]
    NoColon(usize),
    /// `Priority` is not a number.
    #[error("nix-cache-info Priority {0:?} is not a whole number")]
    BadPriority(String),
    /// `StoreDir` is not an absolute path.
    #[error("nix-cache-info StoreDir: {0}")]
    BadStoreDir(#[from] StorePathError),
}

/// Longest `nix-cache-info` accepted, in bytes: real ones are three short lines.
pub const MAX_CACHE_INFO_BYTES: usize = 64 << 10;

impl CacheInfo {
    /// Parses the file (at most [`MAX_CACHE_INFO_BYTES`]); unknown keys are ignored, as Nix
    /// does.
    pub fn parse(text: &str) -> Result<CacheInfo, CacheInfoError> {
        if text.len() > MAX_CACHE_INFO_BYTES {
            return Err(CacheInfoError::TooLarge(text.len()));
        }
        let mut info = CacheInfo::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (k, v) = line.split_once(':').ok_or(CacheInfoError::NoColon(i + 1))?;
            let v = v.trim();
            match k.trim() {
                "StoreDir" => info.store_dir = StoreDir::new(v)?,
                "WantMassQuery" => info.want_mass_query = v == "1",
                "Priority" => {
                    info.priority = Some(
                        v.parse()
                            .map_err(|_| CacheInfoError::BadPriority(v.into()))?,
                    )
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// Renders the file as a server sends it.
    pub fn render(&self) -> String {
        let mut s = format!("StoreDir: {}\n", self.store_dir);
        if self.want_mass_query {
            s.push_str("WantMassQuery: 1\n");
        }
        if let Some(p) = self.priority {
            s.push_str(&format!("Priority: {p}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render() {
        let i =
            CacheInfo::parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\nFoo: bar\n\n")
                .unwrap();
        assert_eq!(i.priority, Some(40));
        assert!(i.want_mass_query);
        assert_eq!(
            i.render(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        assert_eq!(
            CacheInfo::parse("StoreDir: /nix/store\n").unwrap().render(),
            "StoreDir: /nix/store\n"
        );
        assert!(CacheInfo::parse("garbage").is_err());
        let huge = format!(
            "StoreDir: /nix/store\n{}",
            "\n".repeat(MAX_CACHE_INFO_BYTES)
        );
        assert!(matches!(
            CacheInfo::parse(&huge),
            Err(CacheInfoError::TooLarge(_))
        ));
        assert!(CacheInfo::parse("Priority: x").is_err());
        assert!(CacheInfo::parse("StoreDir: relative").is_err());
    }
}
