//! Ed25519 signatures over narinfo fingerprints, in Nix's `name:base64` key and signature format.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, Verifier};
use thiserror::Error;

/// Why a key or signature was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// No `name:` prefix, or an empty name.
    #[error("{what} has no key name; Nix writes them as <name>:<base64>")]
    NoName {
        /// What was being parsed.
        what: &'static str,
    },
    /// The base64 part is not base64 or has the wrong length.
    #[error("{what} {name:?} is not {len} bytes of base64")]
    BadBytes {
        /// What was being parsed.
        what: &'static str,
        /// The key name.
        name: String,
        /// Bytes expected.
        len: usize,
    },
}

fn split<'a>(s: &'a str, what: &'static str, len: usize) -> Result<(&'a str, Vec<u8>), KeyError> {
    let (name, b64) = s.trim().split_once(':').ok_or(KeyError::NoName { what })?;
    if name.is_empty() {
        return Err(KeyError::NoName { what });
    }
    let bytes = B64.decode(b64).map_err(|_| KeyError::BadBytes {
        what,
        name: name.into(),
        len,
    })?;
    if bytes.len() != len {
        return Err(KeyError::BadBytes {
            what,
            name: name.into(),
            len,
        });
    }
    Ok((name, bytes))
}

/// A signature line of a narinfo (`Sig: name:base64`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    /// The name of the key that made it.
    pub key_name: String,
    /// The 64 signature bytes.
    pub bytes: [u8; 64],
}

impl FromStr for Signature {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s, "signature", 64)?;
        Ok(Signature {
            key_name: name.into(),
            bytes: bytes.try_into().expect("length checked"),
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, B64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// A secret key as written by `nix-store --generate-binary-cache-key` (seed followed by public key).
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    /// Parses the contents of a secret-key file.
    pub fn parse(s: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split(s, "secret key", 64)?;
        let seed: [u8; 32] = bytes[..32].try_into().expect("length checked");
        Ok(SecretKey {
            name: name.into(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Makes a key from a 32-byte seed (tests and key generation).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> SecretKey {
        SecretKey {
            name: name.into(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Signs a fingerprint.
    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_bytes()).to_bytes(),
        }
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The secret-key file contents Nix writes (`name:base64(seed || public)`).
    pub fn to_nix_string(&self) -> String {
        let mut b = self.key.to_bytes().to_vec();
        b.extend_from_slice(self.key.verifying_key().as_bytes());
        format!("{}:{}", self.name, B64.encode(b))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:…)", self.name)
    }
}

/// A public key as in `trusted-public-keys` (`name:base64(32 bytes)`).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64`.
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split(s, "public key", 32)?;
        let arr: [u8; 32] = bytes.try_into().expect("length checked");
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::BadBytes {
                what: "public key",
                name: name.into(),
                len: 32,
            })?;
        Ok(PublicKey {
            name: name.into(),
            key,
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` was made by this key over `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_key_file_round_trip() {
        let sk = SecretKey::from_seed("cache-1", [7u8; 32]);
        let text = sk.to_nix_string();
        let sk2 = SecretKey::parse(&text).unwrap();
        let pk = PublicKey::parse(&sk2.public().to_string()).unwrap();
        let sig = sk2.sign("1;/nix/store/x;sha256:y;1;");
        let sig: Signature = sig.to_string().parse().unwrap();
        assert!(pk.verify("1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!pk.verify("1;/nix/store/x;sha256:y;2;", &sig));
        let other = SecretKey::from_seed("cache-2", [7u8; 32]).public();
        assert!(
            !other.verify("1;/nix/store/x;sha256:y;1;", &sig),
            "names must match"
        );
    }

    #[test]
    fn rejects_malformed_keys() {
        assert!(SecretKey::parse("nocolon").is_err());
        assert!(PublicKey::parse("n:AAAA").is_err());
        assert!(":AAAA".parse::<Signature>().is_err());
    }
}
