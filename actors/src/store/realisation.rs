//! Realisations of content-addressed derivations: which store path a derivation's output
//! turned out to be, kept as `realisations/<id>.doi` in a binary cache.
//!
//! A content-addressed derivation's output path is known only once it is built, so a client
//! asks a cache "what did `sha256:<drv hash>!<output>` realise to?" before it can look for a
//! narinfo. The id and the JSON text are Nix's: `{"dependentRealisations":{},"id":"…",
//! "outPath":"<digest>-<name>","signatures":[]}`.

use serde::Deserialize;

use super::{Result, StoreError};
use crate::formats::StorePath;

/// Largest realisation accepted: a real one is a few hundred bytes (more with many
/// dependent realisations); a bigger one is not a realisation.
pub const MAX_REALISATION_BYTES: usize = 64 * 1024;

/// Checks a realisation id, `sha256:<64 hex>!<output name>`, as it appears in a URL or key:
/// anything else could name another object or leave the `realisations/` folder.
pub fn check_id(id: &str) -> Result<()> {
    let bad = || {
        StoreError::Invalid(format!(
            "{id:?} is not a realisation id; it has the form sha256:<64 hex digits>!<output name>"
        ))
    };
    let (hash, output) = id.split_once('!').ok_or_else(bad)?;
    let hex = hash.strip_prefix("sha256:").ok_or_else(bad)?;
    let hex_ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    // Output names are derivation attribute names: Nix allows these characters.
    let output_ok = !output.is_empty()
        && output.len() <= 211
        && output
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
        && !output.starts_with('.');
    if hex_ok && output_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// The key of a realisation in a binary cache.
pub fn key(id: &str) -> String {
    format!("realisations/{id}.doi")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields {
    id: String,
    out_path: String,
}

/// Checks that `text` is the realisation `id`, and returns the base name of its output
/// path (`<digest>-<name>`); a client or bucket that sends another shape is refused.
pub fn check_text(id: &str, text: &str) -> Result<StorePath> {
    let corrupt = |why: String| StoreError::Corrupt(format!("realisation {id}: {why}"));
    let fields: Fields =
        serde_json::from_str(text).map_err(|e| corrupt(format!("not realisation JSON ({e})")))?;
    if fields.id != id {
        return Err(corrupt(format!("it says it is {}", fields.id)));
    }
    StorePath::from_base_name(&fields.out_path)
        .map_err(|e| corrupt(format!("outPath {:?}: {e}", fields.out_path)))
}

/// Nix's JSON text of a realisation (keys sorted, no spaces, as Nix writes it).
pub fn render(id: &str, out_path_base: &str, signatures: &[String]) -> String {
    serde_json::json!({
        "dependentRealisations": {},
        "id": id,
        "outPath": out_path_base,
        "signatures": signatures,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:1a762309e562d30e7d20c0f2c85dab36e37515f95ebd1da1b3c471666ec2e8ed!out";

    #[test]
    fn ids_have_one_shape() {
        check_id(ID).unwrap();
        check_id(&ID.replace("!out", "!dev.doc_2")).unwrap();
        for bad in [
            "",
            "sha256:abc!out",
            &ID.replace("!out", ""),
            &ID.replace("!out", "!../x"),
            &ID.replace("!out", "!a/b"),
            &ID.replace("sha256:", "md5:"),
            &ID.replace("1a76", "zz76"),
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_is_what_nix_writes_and_reads() {
        // Written by Nix 2.8's `nix copy` of a content-addressed derivation.
        let nix = r#"{"dependentRealisations":{},"id":"sha256:1a762309e562d30e7d20c0f2c85dab36e37515f95ebd1da1b3c471666ec2e8ed!out","outPath":"67k82kcdyidpwlwyw883a1hfzhql19xr-ca-thing","signatures":[]}"#;
        assert_eq!(
            render(ID, "67k82kcdyidpwlwyw883a1hfzhql19xr-ca-thing", &[]),
            nix
        );
        let out = check_text(ID, nix).unwrap();
        assert_eq!(out.digest().to_string(), "67k82kcdyidpwlwyw883a1hfzhql19xr");
        assert!(check_text(&ID.replace("!out", "!dev"), nix).is_err());
        assert!(check_text(ID, "{}").is_err());
        assert!(check_text(ID, &nix.replace("67k82", "../..")).is_err());
    }
}
