//! nix-cache-info: whatever parses renders to text that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached_formats::CacheInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = CacheInfo::parse(text) else {
        return;
    };
    let rendered = info.render();
    let back = CacheInfo::parse(&rendered)
        .unwrap_or_else(|e| panic!("rendered nix-cache-info does not parse: {e}\n{rendered}"));
    assert_eq!(back, info, "round trip changed nix-cache-info:\n{rendered}");
    assert_eq!(back.render(), rendered);
});
