//! The explorer's in-NAR path parser: what it accepts has only names a NAR can hold, its
//! encoded form parses back to the same path, and any byte string survives as a segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached_actors::http::nar_path::{encode_segment, NarPath};

fuzz_target!(|data: &[u8]| {
    // Any bytes a NAR name can hold round-trip through one encoded segment.
    if !data.is_empty()
        && !data.contains(&0)
        && !data.contains(&b'/')
        && data != b"."
        && data != b".."
    {
        let p = NarPath::parse(&encode_segment(data)).expect("an encoded name parses");
        assert_eq!(p.segments(), &[data.to_vec()]);
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = NarPath::parse(s) {
        for seg in p.segments() {
            assert!(
                !seg.is_empty() && !seg.contains(&0) && !seg.contains(&b'/'),
                "{seg:?}"
            );
            assert!(
                seg != b"." && seg != b"..",
                "traversal segment accepted from {s:?}"
            );
        }
        let enc = p.encoded();
        assert!(
            !enc.contains(['<', '>', '"', '\'', '&', ' ']),
            "{enc:?} unsafe in HTML"
        );
        assert_eq!(NarPath::parse(&enc).unwrap(), p, "{s:?} -> {enc:?}");
        assert_eq!(
            p.parent().segments().len(),
            p.segments().len().saturating_sub(1)
        );
        // Resolving a symlink never leaves the NAR or yields a traversal segment.
        if let Some(r) = p.resolve(data) {
            assert!(r
                .segments()
                .iter()
                .all(|g| !g.is_empty() && g != b"." && g != b".."));
        }
    }
});
