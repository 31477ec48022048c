//! Inputs the fuzzers (`fuzz/`, see README, Fuzzing) found breaking a property, replayed with
//! the same property in the ordinary test suite, so a regression fails CI without libFuzzer.
//! Each folder under `tests/fuzz-regressions/` holds the inputs of one fuzz target.

use std::path::{Path, PathBuf};

use nixcached_formats::{nixbase32, CacheInfo, Hash, NarInfo, StoreDir, StorePath};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no regression inputs in {}", dir.display());
    out
}

#[test]
fn cache_info_round_trips() {
    for (p, data) in inputs("cache_info") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(info) = CacheInfo::parse(text) {
            let back = CacheInfo::parse(&info.render())
                .unwrap_or_else(|e| panic!("{}: rendered form refused: {e}", p.display()));
            assert_eq!(back, info, "{}", p.display());
        }
    }
}

#[test]
fn string_forms_round_trip() {
    for (p, data) in inputs("store_path") {
        if let Ok(bytes) = nixbase32::decode(&data) {
            assert_eq!(
                nixbase32::encode(&bytes).as_bytes(),
                data,
                "{}: non-canonical nixbase32 accepted",
                p.display()
            );
        }
        let Ok(s) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(h) = s.parse::<Hash>() {
            for form in [h.to_nix32(), h.to_sri(), h.to_base16()] {
                assert_eq!(form.parse::<Hash>().unwrap(), h, "{}", p.display());
            }
        }
        if let Ok(dir) = StoreDir::new(s) {
            assert_eq!(StoreDir::new(dir.as_str()).unwrap(), dir, "{}", p.display());
        }
        if let Ok(sp) = StorePath::from_base_name(s) {
            assert_eq!(sp.to_string(), s, "{}", p.display());
        }
    }
}

#[test]
fn narinfos_round_trip() {
    for (p, data) in inputs("narinfo") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(info) = NarInfo::parse(text) {
            let rendered = info.render();
            let back = NarInfo::parse(&rendered)
                .unwrap_or_else(|e| panic!("{}: rendered form refused: {e}", p.display()));
            assert_eq!(back, info, "{}", p.display());
            assert_eq!(back.render(), rendered, "{}", p.display());
        }
    }
}
