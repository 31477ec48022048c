//! What a pushed object must satisfy before anything is stored: the shape of NAR URLs, and
//! a narinfo's agreement with the NAR that was pushed for it.

use actix_web::http::StatusCode;

use crate::formats::{nixbase32, Compression, Hash, NarInfo};

/// Why a push was refused: the status and the one line the client reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// One line saying what is wrong and what to do.
    pub message: String,
}

impl Refusal {
    /// A refusal with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, message)
    }

    /// 409: something this request depends on is not in the cache yet.
    pub fn conflict(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::CONFLICT, message)
    }

    /// 422: well-formed, but it contradicts what the cache holds or was sent.
    pub fn unprocessable(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

/// What a pushed NAR file hashed to as it arrived: its own hash and size, and the hash and
/// size of the NAR inside once decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarRecord {
    /// How the file was taken to be compressed (from its name).
    pub compression: Compression,
    /// SHA-256 of the file as stored.
    pub file_hash: Hash,
    /// Bytes of the file as stored.
    pub file_size: u64,
    /// SHA-256 of the decompressed NAR.
    pub nar_hash: Hash,
    /// Bytes of the decompressed NAR.
    pub nar_size: u64,
}

/// The compression a NAR URL names, when the URL has the shape a binary cache gives NARs:
/// `nar/<nixbase32>.nar` plus the extension of a known compression, in no other folder and
/// with nothing else in it (no `..`, no scheme, no absolute path).
pub fn nar_url(url: &str) -> Result<(&str, Compression), Refusal> {
    let refuse = || {
        Refusal::bad(format!(
            "{url:?} is not a NAR name this cache takes; name NARs nar/<FileHash in nixbase32>.nar[.xz|.zst|.bz2|.gz|.br] as nix copy does"
        ))
    };
    let rest = url.strip_prefix("nar/").ok_or_else(refuse)?;
    let (stem, ext) = rest.split_once(".nar").ok_or_else(refuse)?;
    let compression = Compression::ALL
        .into_iter()
        .find(|c| c.extension() == ext)
        .ok_or_else(refuse)?;
    if stem.is_empty() || stem.len() > 128 || !nixbase32::is_valid(stem.as_bytes()) {
        return Err(refuse());
    }
    Ok((stem, compression))
}

/// Refuses a NAR whose name is not its content: a cache names a NAR by the hash of the file
/// (Nix's `nix copy`) or, uncompressed, of the NAR (nixcached's `upload`). A name that is its
/// content means a second push of the same name carries the same bytes, so it can never
/// replace a NAR another narinfo relies on with different ones.
pub fn name_is_content(stem: &str, record: &NarRecord) -> Result<(), Refusal> {
    let named = |h: &Hash| stem == nixbase32::encode(h.digest());
    if named(&record.file_hash) || named(&record.nar_hash) {
        return Ok(());
    }
    Err(Refusal::unprocessable(format!(
        "the NAR pushed as nar/{stem}… hashes to {}; name it nar/{}.nar{} (its FileHash) and push it again",
        record.file_hash,
        nixbase32::encode(record.file_hash.digest()),
        record.compression.extension()
    )))
}

/// Checks a narinfo's URL, compression, file and NAR hashes and sizes against what its NAR
/// hashed to; fills in FileHash and FileSize when the narinfo leaves them out.
pub fn matches_record(info: &mut NarInfo, record: &NarRecord) -> Result<(), Refusal> {
    let what = format!("{} (URL {})", info.store_path, info.url);
    if info.compression != record.compression {
        return Err(Refusal::unprocessable(format!(
            "{what} says Compression: {} but its URL names a {} file; make the two agree",
            info.compression, record.compression
        )));
    }
    let mismatch = |field: &str, said: String, got: String| {
        Refusal::unprocessable(format!(
            "{what}: the narinfo says {field} {said} but the NAR pushed there has {got}; push the NAR again or fix the narinfo"
        ))
    };
    if let Some(h) = &info.file_hash {
        if *h != record.file_hash {
            return Err(mismatch(
                "FileHash",
                h.to_string(),
                record.file_hash.to_string(),
            ));
        }
    }
    if let Some(n) = info.file_size {
        if n != record.file_size {
            return Err(mismatch(
                "FileSize",
                n.to_string(),
                record.file_size.to_string(),
            ));
        }
    }
    if info.nar_hash != record.nar_hash {
        return Err(mismatch(
            "NarHash",
            info.nar_hash.to_string(),
            record.nar_hash.to_string(),
        ));
    }
    if info.nar_size != record.nar_size {
        return Err(mismatch(
            "NarSize",
            info.nar_size.to_string(),
            record.nar_size.to_string(),
        ));
    }
    info.file_hash = Some(record.file_hash.clone());
    info.file_size = Some(record.file_size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

    #[test]
    fn nar_urls_of_the_cache_shape_only() {
        assert_eq!(
            nar_url(&format!("nar/{H}.nar.xz")),
            Ok((H, Compression::Xz))
        );
        assert_eq!(nar_url(&format!("nar/{H}.nar")), Ok((H, Compression::None)));
        for bad in [
            "../x".to_owned(),
            "nar/../../etc".to_owned(),
            format!("nar/../{H}.nar"),
            format!("nar/x/{H}.nar"),
            format!("/nar/{H}.nar"),
            format!("http://evil/nar/{H}.nar"),
            format!("nar/{H}.nar.rar"),
            format!("nar/{H}.nar.xz/x"),
            format!("{H}.nar"),
            "nar/.nar".to_owned(),
            "nar/eeee.nar".to_owned(),
        ] {
            assert!(nar_url(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_name_must_be_its_content() {
        let rec = NarRecord {
            compression: Compression::Xz,
            file_hash: Hash::sha256_of(b"file"),
            file_size: 4,
            nar_hash: Hash::sha256_of(b"nar"),
            nar_size: 3,
        };
        let file = nixbase32::encode(rec.file_hash.digest());
        let nar = nixbase32::encode(rec.nar_hash.digest());
        assert!(name_is_content(&file, &rec).is_ok());
        assert!(name_is_content(&nar, &rec).is_ok());
        let e = name_is_content(H, &rec).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.contains(&file), "{}", e.message);
    }
}
