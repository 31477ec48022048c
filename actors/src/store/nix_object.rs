//! The narinfo a binary-cache client gets for an object of a Nix store, built from what the
//! store says about it as text: a row of the local database, or `nix-store --serve`'s answer.
//! Both stores serve the NAR uncompressed at [`super::nar_url_of`].

use super::{Result, StoreError};
use crate::formats::{Compression, Hash, NarInfo, StoreDir, StorePath};

/// What a Nix store says about one object, as it says it.
#[derive(Debug)]
pub struct ObjectText<'a> {
    /// The store path.
    pub path: &'a str,
    /// `sha256:…` of the NAR.
    pub nar_hash: &'a str,
    /// The NAR's size.
    pub nar_size: u64,
    /// Store paths of the references.
    pub references: &'a [String],
    /// The deriver's store path, when known.
    pub deriver: Option<&'a str>,
    /// Signatures (`name:base64`); unparsable ones are dropped.
    pub sigs: Vec<&'a str>,
    /// Content address, when there is one.
    pub ca: Option<&'a str>,
}

impl ObjectText<'_> {
    /// The narinfo for this object in `dir`; `source` names where the text came from, for
    /// the error that says a field does not parse.
    pub fn to_narinfo(&self, dir: &StoreDir, source: &str) -> Result<NarInfo> {
        let corrupt =
            |what: String| StoreError::Corrupt(format!("{source} for {}: {what}", self.path));
        let store_path = dir
            .parse_path(self.path)
            .map_err(|e| corrupt(e.to_string()))?;
        let nar_hash: Hash = self
            .nar_hash
            .parse()
            .map_err(|e: crate::formats::hash::HashError| corrupt(e.to_string()))?;
        let mut references = self
            .references
            .iter()
            .map(|r| dir.parse_path(r).map_err(|e| corrupt(e.to_string())))
            .collect::<Result<Vec<StorePath>>>()?;
        references.sort();
        Ok(NarInfo {
            store_dir: dir.clone(),
            url: super::nar_url_of(store_path.digest()),
            store_path,
            compression: Compression::None,
            file_hash: Some(nar_hash.clone()),
            file_size: Some(self.nar_size),
            nar_hash,
            nar_size: self.nar_size,
            references,
            deriver: self
                .deriver
                .filter(|d| !d.is_empty())
                .and_then(|d| dir.parse_path(d).ok())
                .map(|p| p.to_string()),
            system: None,
            sigs: self.sigs.iter().filter_map(|s| s.parse().ok()).collect(),
            ca: self.ca.filter(|c| !c.is_empty()).map(str::to_owned),
            extra: Vec::new(),
        })
    }
}
