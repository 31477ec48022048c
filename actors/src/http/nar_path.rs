//! Paths inside a NAR as they appear in explorer URLs (`/<digest>/browse/<path>`).
//!
//! A NAR may contain any byte except `/` and NUL in a name, so the path travels percent-encoded
//! in URLs and is decoded back to bytes here. Whatever could climb out of the archive (`..`,
//! `.`, empty segments) or could not be a NAR name (NUL) is refused before the store is asked.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Why a path from a URL is not a path inside a NAR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarPathError {
    /// A `.` or `..` segment: paths name entries, they never navigate.
    #[error("the path contains a '.' or '..' segment; link to the entry by its own name")]
    Traversal,
    /// An empty segment (`a//b`) or a NUL byte, which no NAR entry can have.
    #[error("the path contains an empty segment or a NUL byte, which no NAR entry has")]
    Malformed,
}

/// A validated path inside a NAR: its segments as raw bytes, root first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NarPath {
    segments: Vec<Vec<u8>>,
}

/// Everything but unreserved characters is encoded in a segment, so any name survives a
/// round trip through a URL and an HTML attribute.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl NarPath {
    /// Parses the percent-encoded rest of a URL (leading and one trailing `/` allowed).
    pub fn parse(encoded: &str) -> Result<NarPath, NarPathError> {
        let trimmed = encoded.trim_start_matches('/');
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        if trimmed.is_empty() {
            return Ok(NarPath::default());
        }
        let mut segments = Vec::new();
        for raw in trimmed.split('/') {
            let seg: Vec<u8> = percent_decode_str(raw).collect();
            if seg.is_empty() || seg.contains(&0) || seg.contains(&b'/') {
                return Err(NarPathError::Malformed);
            }
            if seg == b"." || seg == b".." {
                return Err(NarPathError::Traversal);
            }
            segments.push(seg);
        }
        Ok(NarPath { segments })
    }

    /// The segments, root first.
    pub fn segments(&self) -> &[Vec<u8>] {
        &self.segments
    }

    /// True for the NAR's root.
    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// The path one level down.
    pub fn join(&self, name: &[u8]) -> NarPath {
        let mut segments = self.segments.clone();
        segments.push(name.to_vec());
        NarPath { segments }
    }

    /// The path one level up (the root's parent is the root).
    pub fn parent(&self) -> NarPath {
        let mut segments = self.segments.clone();
        segments.pop();
        NarPath { segments }
    }

    /// Where a symlink target (raw bytes, relative to this directory) leads, when it stays
    /// inside the NAR: `.` and empty segments are skipped, `..` climbs, climbing above the
    /// root gives `None`.
    pub fn resolve(&self, target: &[u8]) -> Option<NarPath> {
        let mut segments = self.segments.clone();
        for seg in target.split(|&b| b == b'/') {
            match seg {
                b"" | b"." => {}
                b".." => {
                    segments.pop()?;
                }
                s if s.contains(&0) => return None,
                s => segments.push(s.to_vec()),
            }
        }
        Some(NarPath { segments })
    }

    /// The `/`-joined bytes, as the NAR reader names entries (empty for the root).
    pub fn as_bytes(&self) -> Vec<u8> {
        self.segments.join(&b'/')
    }

    /// For display: `/`-joined, non-UTF-8 bytes replaced (the caller still HTML-escapes).
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.as_bytes()).into_owned()
    }

    /// The last segment for display (empty for the root).
    pub fn file_name(&self) -> String {
        self.segments
            .last()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default()
    }

    /// Percent-encoded, `/`-joined, without a leading `/`: safe in a URL and in an attribute.
    pub fn encoded(&self) -> String {
        self.segments
            .iter()
            .map(|s| encode_segment(s))
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// Percent-encodes one name for a URL path segment.
pub fn encode_segment(name: &[u8]) -> String {
    // Non-UTF-8 bytes are encoded byte by byte, so they too round-trip.
    match std::str::from_utf8(name) {
        Ok(s) => utf8_percent_encode(s, SEGMENT).to_string(),
        Err(_) => percent_encoding::percent_encode(name, SEGMENT).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_any_name_and_refuses_traversal() {
        let p = NarPath::parse("/bin/%3Cscript%3E%20x/caf%C3%A9%FF/").unwrap();
        assert_eq!(
            p.segments(),
            &[
                b"bin".to_vec(),
                b"<script> x".to_vec(),
                b"caf\xc3\xa9\xff".to_vec()
            ]
        );
        assert_eq!(NarPath::parse(&p.encoded()).unwrap(), p);
        assert!(!p.encoded().contains('<'));
        assert!(NarPath::parse("").unwrap().is_root());
        assert_eq!(NarPath::parse("a/../b"), Err(NarPathError::Traversal));
        assert_eq!(NarPath::parse("a/%2e%2e/b"), Err(NarPathError::Traversal));
        assert_eq!(NarPath::parse("./a"), Err(NarPathError::Traversal));
        assert_eq!(NarPath::parse("a//b"), Err(NarPathError::Malformed));
        assert_eq!(NarPath::parse("a/%00"), Err(NarPathError::Malformed));
        assert_eq!(NarPath::parse("a%2Fb"), Err(NarPathError::Malformed));
        assert_eq!(p.parent().parent().encoded(), "bin");
        assert_eq!(p.as_bytes(), b"bin/<script> x/caf\xc3\xa9\xff".to_vec());
        let bin = NarPath::parse("bin").unwrap();
        assert_eq!(bin.resolve(b"../lib/%41").unwrap().as_bytes(), b"lib/%41");
        assert_eq!(bin.resolve(b"./x//y").unwrap().as_bytes(), b"bin/x/y");
        assert_eq!(bin.resolve(b"../../etc"), None);
    }
}
