//! narinfo: whatever parses renders to text that parses to the same narinfo, and rendering
//! is a fixed point (render(parse(render(x))) == render(x)). The fingerprint of a parsed
//! narinfo is stable across the round trip, so signatures keep verifying.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached_formats::NarInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = NarInfo::parse(text) else {
        return;
    };
    let rendered = info.render();
    let back = NarInfo::parse(&rendered)
        .unwrap_or_else(|e| panic!("rendered narinfo does not parse: {e}\n{rendered}"));
    assert_eq!(back, info, "round trip changed the narinfo:\n{rendered}");
    assert_eq!(back.render(), rendered);
    assert_eq!(back.fingerprint(), info.fingerprint());
});
