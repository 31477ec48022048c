//! Content hashes as Nix writes them: `sha256:<nixbase32>`, base16, base64 and SRI (`sha256-<base64>`).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::Digest;
use thiserror::Error;

use super::nixbase32;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algo {
    /// MD5 (16 bytes); only seen in old fixed-output derivations.
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes); what NAR and file hashes use.
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl Algo {
    /// Digest length in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            Algo::Md5 => 16,
            Algo::Sha1 => 20,
            Algo::Sha256 => 32,
            Algo::Sha512 => 64,
        }
    }

    /// The name Nix prints (`sha256`).
    pub const fn name(self) -> &'static str {
        match self {
            Algo::Md5 => "md5",
            Algo::Sha1 => "sha1",
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        }
    }

    fn from_name(s: &str) -> Option<Algo> {
        Some(match s {
            "md5" => Algo::Md5,
            "sha1" => Algo::Sha1,
            "sha256" => Algo::Sha256,
            "sha512" => Algo::Sha512,
            _ => return None,
        })
    }
}

/// Why a hash string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    /// No `algo:` or `algo-` prefix.
    #[error("hash {0:?} has no algorithm prefix; expected for example sha256:<hash>")]
    NoAlgo(String),
    /// Prefix names an algorithm Nix does not have.
    #[error("unknown hash algorithm {0:?}; Nix knows md5, sha1, sha256 and sha512")]
    UnknownAlgo(String),
    /// The digest text is not base16, nixbase32 or base64 of the right length.
    #[error("hash {0:?} is not valid base16, nixbase32 or base64 for its algorithm")]
    BadDigest(String),
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Hash {
    algo: Algo,
    digest: Vec<u8>,
}

impl Hash {
    /// Wraps raw digest bytes; panics if the length does not fit the algorithm (a programming error).
    pub fn new(algo: Algo, digest: &[u8]) -> Hash {
        assert_eq!(
            digest.len(),
            algo.digest_len(),
            "digest length for {}",
            algo.name()
        );
        Hash {
            algo,
            digest: digest.to_vec(),
        }
    }

    /// SHA-256 of `data`.
    pub fn sha256_of(data: &[u8]) -> Hash {
        Hash::new(Algo::Sha256, &sha2::Sha256::digest(data))
    }

    /// The algorithm.
    pub fn algo(&self) -> Algo {
        self.algo
    }

    /// The raw digest.
    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// `sha256:<nixbase32>`, the form narinfos use.
    pub fn to_nix32(&self) -> String {
        format!("{}:{}", self.algo.name(), nixbase32::encode(&self.digest))
    }

    /// `sha256:<base16>`, the form Nix's database stores.
    pub fn to_base16(&self) -> String {
        format!("{}:{}", self.algo.name(), hex::encode(&self.digest))
    }

    /// `sha256-<base64>`, the Subresource Integrity form of newer Nix and of ETags.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo.name(), B64.encode(&self.digest))
    }

    /// Parses a digest without prefix, given its algorithm, in any of Nix's three encodings.
    pub fn from_digest_text(algo: Algo, text: &str) -> Result<Hash, HashError> {
        let bad = || HashError::BadDigest(text.to_string());
        let n = algo.digest_len();
        let digest = if text.len() == 2 * n {
            hex::decode(text).map_err(|_| bad())?
        } else if text.len() == nixbase32::encoded_len(n) {
            nixbase32::decode(text.as_bytes()).map_err(|_| bad())?
        } else if text.len() == n.div_ceil(3) * 4 {
            B64.decode(text).map_err(|_| bad())?
        } else {
            return Err(bad());
        };
        if digest.len() != n {
            return Err(bad());
        }
        Ok(Hash { algo, digest })
    }
}

impl FromStr for Hash {
    type Err = HashError;

    /// Accepts `algo:<base16|nixbase32|base64>` and SRI `algo-<base64>`.
    fn from_str(s: &str) -> Result<Hash, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            let algo = Algo::from_name(algo).ok_or_else(|| HashError::UnknownAlgo(algo.into()))?;
            return Hash::from_digest_text(algo, rest);
        }
        if let Some((algo, rest)) = s.split_once('-') {
            let algo = Algo::from_name(algo).ok_or_else(|| HashError::UnknownAlgo(algo.into()))?;
            let digest = B64
                .decode(rest)
                .map_err(|_| HashError::BadDigest(s.to_string()))?;
            if digest.len() != algo.digest_len() {
                return Err(HashError::BadDigest(s.to_string()));
            }
            return Ok(Hash { algo, digest });
        }
        Err(HashError::NoAlgo(s.to_string()))
    }
}

impl fmt::Display for Hash {
    /// Nix's narinfo form, `sha256:<nixbase32>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_nix32())
    }
}

/// Incremental SHA-256 that also counts bytes, for hashing streams as they pass.
#[derive(Default, Clone)]
pub struct HashingCounter {
    hasher: sha2::Sha256,
    len: u64,
}

impl HashingCounter {
    /// A fresh counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The SHA-256 and the byte count.
    pub fn finish(self) -> (Hash, u64) {
        (Hash::new(Algo::Sha256, &self.hasher.finalize()), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_encoding() {
        let h = Hash::sha256_of(b"");
        let forms = [
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_string(),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_string(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_string(),
        ];
        for f in forms {
            assert_eq!(f.parse::<Hash>().unwrap(), h, "{f}");
        }
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            h.to_base16(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            "sha256:abc".parse::<Hash>(),
            Err(HashError::BadDigest(_))
        ));
        assert!(matches!(
            "blake9:abc".parse::<Hash>(),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!("abc".parse::<Hash>(), Err(HashError::NoAlgo(_))));
    }
}
