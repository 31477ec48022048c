//! `.ls` JSON listings: whatever parses renders (as Nix's `write-nar-listing` would) to JSON
//! that parses to the same listing, rendering is a fixed point, and the parser's heap stays
//! within a multiple of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached_formats::nar::Listing;
use nixcached_fuzz::peak_heap;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (parsed, heap) = peak_heap(|| Listing::from_json(text));
    // serde_json's Value tree plus the listing: generous, but linear.
    assert!(
        heap <= 256 * text.len() + (64 << 10),
        "listing parser held {heap} bytes of heap for {} bytes of JSON",
        text.len()
    );
    let Ok(listing) = parsed else {
        return;
    };
    let json = listing.to_json();
    let back = Listing::from_json(&json)
        .unwrap_or_else(|e| panic!("rendered listing does not parse: {e}\n{json}"));
    assert_eq!(back, listing);
    assert_eq!(back.to_json(), json);
});
