//! Nix's base-32 encoding ("nixbase32").
//!
//! Nix encodes hashes in a base-32 alphabet without `e`, `o`, `u` and `t` and, unlike RFC 4648,
//! walks the bits from the end of the input, so the encoding of a hash is not a prefix-stable
//! string. Store-path digests (20 bytes) are 32 characters; SHA-256 hashes are 52.

use thiserror::Error;

/// The 32 characters Nix uses, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not valid nixbase32.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// A character outside [`ALPHABET`].
    #[error("character {0:?} is not in Nix's base-32 alphabet (0-9 a-z without e, o, u, t)")]
    BadChar(char),
    /// Bits left over that do not fit the output: the input is not a canonical encoding.
    #[error("base-32 string has non-zero padding bits; it is not a canonical Nix hash")]
    NonZeroPadding,
    /// A length no encoding has (for example 62: 38 bytes take 61 characters), which would
    /// let two strings decode to the same bytes.
    #[error("a base-32 string of {0} characters is not the encoding of any byte string")]
    BadLength(usize),
}

/// Length in characters of the encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Length in bytes of a canonical encoding of `n` characters.
pub const fn decoded_len(n: usize) -> usize {
    n * 5 / 8
}

/// Encodes bytes as nixbase32.
pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = Vec::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let low = input[i] as u16 >> j;
        let high = if i + 1 < input.len() {
            (input[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize]);
    }
    // The alphabet is ASCII.
    String::from_utf8(out).expect("ascii")
}

fn value_of(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes nixbase32 into bytes; the output length is `decoded_len(input.len())`.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let out_len = decoded_len(input.len());
    if encoded_len(out_len) != input.len() {
        return Err(DecodeError::BadLength(input.len()));
    }
    let mut out = vec![0u8; out_len];
    for (n, &c) in input.iter().rev().enumerate() {
        let digit = value_of(c).ok_or(DecodeError::BadChar(c as char))? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        if i < out_len {
            out[i] |= (digit << j) as u8;
        } else if digit << j != 0 {
            return Err(DecodeError::NonZeroPadding);
        }
        let carry = digit >> (8 - j);
        if i + 1 < out_len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(DecodeError::NonZeroPadding);
        }
    }
    Ok(out)
}

/// True when every byte of `s` is in the alphabet.
pub fn is_valid(s: &[u8]) -> bool {
    s.iter().all(|&c| value_of(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // sha256("") as Nix prints it with `nix-hash --type sha256 --to-base32`.
        let empty = hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            decode(b"0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap(),
            empty
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn round_trip_all_lengths() {
        for len in 0..70usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = encode(&data);
            assert_eq!(enc.len(), encoded_len(len));
            assert_eq!(decode(enc.as_bytes()).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode(b"0e"), Err(DecodeError::BadChar('e')));
        // 52 chars of 'z' sets bits beyond 256.
        let s = "z".repeat(52);
        assert_eq!(decode(s.as_bytes()), Err(DecodeError::NonZeroPadding));
        // Found by fuzzing (store_path target): 62 characters decoded to the 38 bytes that
        // encode as 61, so encode(decode(s)) != s.
        assert_eq!(decode(&[b'0'; 62]), Err(DecodeError::BadLength(62)));
        assert_eq!(decode(b"0"), Err(DecodeError::BadLength(1)));
        for n in 0..100 {
            let ok = decode(&vec![b'0'; n]).is_ok();
            assert_eq!(ok, encoded_len(decoded_len(n)) == n, "length {n}");
        }
    }
}
