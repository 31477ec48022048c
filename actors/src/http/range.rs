//! The HTTP `Range` header, as far as a binary cache needs it: one byte range.

use crate::store::ByteRange;

/// Parses a `Range` header value. Returns `None` for anything other than a single well-formed
/// byte range, in which case the server answers with the whole object, as RFC 9110 allows.
pub fn parse(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return b.parse().ok().map(ByteRange::Last);
    }
    let start: u64 = a.parse().ok()?;
    if b.is_empty() {
        return Some(ByteRange::span(start, None));
    }
    let last: u64 = b.parse().ok()?;
    (last >= start).then(|| ByteRange::span(start, Some(last.saturating_add(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("bytes=0-99"), Some(ByteRange::span(0, Some(100))));
        assert_eq!(parse("bytes=100-"), Some(ByteRange::span(100, None)));
        assert_eq!(parse("bytes=-5"), Some(ByteRange::Last(5)));
        assert_eq!(parse("bytes=5-1"), None);
        assert_eq!(parse("bytes=0-1,5-6"), None);
        assert_eq!(parse("items=0-1"), None);
        assert_eq!(parse("bytes=x-"), None);
    }
}
