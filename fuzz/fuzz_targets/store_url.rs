//! Store URLs in every scheme and dialect: parsing never panics, is deterministic, and what
//! it accepts holds the invariants the stores rely on (a bucket name that is a host, a prefix
//! that is a clean relative folder, an S3 endpoint that is an http(s) origin).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixcached_actors::store::blobs::check_key;
use nixcached_actors::store::url::StoreUrl;

fn clean_prefix(p: &str) {
    assert!(!p.starts_with('/') && !p.ends_with('/'), "prefix {p:?}");
    if !p.is_empty() {
        assert!(check_key(p).is_ok(), "prefix {p:?} is not a clean key");
    }
}

fn bucket(b: &str) {
    assert!(!b.is_empty());
    assert!(
        b.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "bucket {b:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Absolute paths name local stores: parsing one looks at the file system. Only the
    // parser's own paths (`local?root=`) are fuzzed, not arbitrary host paths.
    if s.starts_with('/') {
        return;
    }
    let first = StoreUrl::parse(s);
    let again = StoreUrl::parse(s);
    match (&first, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parse is not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parse is not deterministic"),
    }
    let Ok(url) = first else {
        return;
    };
    match url {
        StoreUrl::S3(o) => {
            bucket(&o.bucket);
            clean_prefix(&o.prefix);
            if let Some(e) = &o.endpoint {
                let u = url::Url::parse(e).unwrap_or_else(|err| panic!("endpoint {e:?}: {err}"));
                assert!(matches!(u.scheme(), "http" | "https"), "endpoint {e:?}");
                assert!(
                    u.host_str().is_some_and(|h| !h.is_empty()),
                    "endpoint {e:?}"
                );
                assert!(u.query().is_none() && !e.ends_with('/'), "endpoint {e:?}");
            }
        }
        StoreUrl::Gcs(o) => {
            bucket(&o.bucket);
            clean_prefix(&o.prefix);
        }
        StoreUrl::File { dir, .. } => assert!(dir.is_absolute(), "file dir {dir:?}"),
        StoreUrl::Http(u) => {
            assert!(matches!(u.scheme(), "http" | "https"));
            assert!(u.host_str().is_some_and(|h| !h.is_empty()));
        }
        StoreUrl::Ssh(t) => {
            assert!(!t.host.is_empty(), "ssh host empty");
            assert!(
                !t.host.starts_with('-'),
                "ssh host {:?} would be read as an option",
                t.host
            );
            if let Some(u) = &t.user {
                assert!(!u.is_empty() && !u.starts_with('-'), "ssh user {u:?}");
            }
        }
        StoreUrl::Local(_) => {}
    }
});
