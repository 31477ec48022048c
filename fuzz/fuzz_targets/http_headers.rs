//! HTTP request headers the cache reads: `Range`, `Accept` and `Accept-Encoding`. The first
//! byte picks the header (R, A, E; anything else: all three), the rest is its value.
//! Properties: a parsed range is a valid single range that `resolve` keeps inside the object,
//! Accept qualities stay within 0..=1, and negotiation does not depend on letter case.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached_actors::http::{negotiate, range};
use nixcached_actors::store::ByteRange;

fn check_range(v: &str, size_seed: u64) {
    let Some(r) = range::parse(v) else {
        return;
    };
    if let ByteRange::Span {
        start,
        end: Some(end),
    } = r
    {
        assert!(start < end, "{v:?} parsed to empty span {start}..{end}");
    }
    for size in [0, 1, size_seed, u64::MAX] {
        if let Some((a, b)) = r.resolve(size) {
            assert!(a < b && b <= size, "{v:?} resolved to {a}..{b} of {size}");
        }
    }
}

fn check_accept(v: &str) {
    for ty in ["text/html", "text/x-nix-narinfo", "application/x-nix-nar"] {
        let q = negotiate::accept_quality(v, ty);
        assert!((0.0..=1.0).contains(&q), "{v:?} gives {ty} quality {q}");
        assert_eq!(
            q,
            negotiate::accept_quality(&v.to_ascii_uppercase(), ty),
            "case: {v:?}"
        );
    }
}

fn check_encoding(v: &str) {
    let z = negotiate::accepts_zstd([v]);
    assert_eq!(
        z,
        negotiate::accepts_zstd([v.to_ascii_uppercase().as_str()]),
        "case: {v:?}"
    );
    // Splitting one header into two by its commas changes nothing.
    let parts: Vec<&str> = v.split(',').collect();
    assert_eq!(
        z,
        negotiate::accepts_zstd(parts.iter().copied()),
        "split: {v:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(v) = std::str::from_utf8(rest) else {
        return;
    };
    let size_seed = rest
        .iter()
        .fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
    match which {
        b'R' => check_range(v, size_seed),
        b'A' => check_accept(v),
        b'E' => check_encoding(v),
        _ => {
            check_range(v, size_seed);
            check_accept(v);
            check_encoding(v);
        }
    }
});
