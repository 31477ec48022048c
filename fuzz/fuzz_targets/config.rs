//! The config file (`nixcached --config FILE`): parsing never panics, and what it accepts
//! passes the checks it promises (something to run, every cache a store, every upload an
//! input and a destination, prefixes of the form /x).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::parse(text, "fuzz.toml") else {
        return;
    };
    assert!(!cfg.caches.is_empty() || !cfg.uploads.is_empty());
    for c in &cfg.caches {
        assert!(!c.store.is_empty());
        assert!(c.prefix.is_empty() || (c.prefix.starts_with('/') && !c.prefix.ends_with('/')));
    }
    for u in &cfg.uploads {
        assert!(u.input.is_some() && !u.dest.is_empty());
    }
});
