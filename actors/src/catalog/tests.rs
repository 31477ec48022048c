//! Unit tests of the catalog: pages against a full sort, closures, referrers, the bound.

use super::*;

fn info(name: &str, digest_char: char, size: u64, refs: &[char]) -> NarInfo {
    let d = |c: char| std::iter::repeat_n(c, 32).collect::<String>();
    let refs: Vec<String> = refs.iter().map(|c| format!("{}-r", d(*c))).collect();
    NarInfo::parse(&format!(
        "StorePath: /nix/store/{}-{name}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: {size}\nReferences: {}\n",
        d(digest_char),
        refs.join(" ")
    ))
    .unwrap()
}

#[test]
fn pages_sorts_closures_and_referrers() {
    let c = Catalog::default();
    c.learn(&info("lib", 'a', 10, &[]));
    c.learn(&info("lib", 'b', 100, &['a']));
    c.learn(&info("lib", 'c', 1000, &['b', 'c']));
    c.learn(&info("other", 'd', 5, &['z']));
    let first = c.page("", SortBy::Name, None, 2);
    assert_eq!(first.matching, 4);
    let names: Vec<&str> = first.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["lib", "lib"]);
    let next = c.page("", SortBy::Name, first.next_after.as_deref(), 2);
    let names: Vec<&str> = next.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["lib", "other"]);
    assert!(next.next_after.is_none());
    assert!(!next.rows[1].closure_complete, "z is unknown");
    let by_size = c.page("LIB", SortBy::Size, None, 10);
    let sizes: Vec<u64> = by_size.rows.iter().map(|r| r.nar_size).collect();
    assert_eq!(sizes, [1000, 100, 10]);
    assert_eq!(by_size.rows[0].closure_nar_size, 1110);
    assert_eq!(by_size.rows[0].closure_count, 3);
    assert!(by_size.rows[0].closure_complete);
    let after = c.page("lib", SortBy::Size, Some(&by_size.rows[0].digest), 1);
    assert_eq!(after.rows[0].nar_size, 100);
    assert!(after.next_after.is_some());
    let a = "a".repeat(32);
    assert_eq!(c.referrers(&a).len(), 1);
    assert_eq!(
        c.lock().unknown_references(),
        vec![Digest::parse(&"z".repeat(32)).unwrap()]
    );
}

/// A digest made of nixbase32 characters from a number.
fn digest_of(i: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut s = String::new();
    let mut n = i * 2654435761 % (1 << 40);
    for _ in 0..32 {
        s.push(ALPHABET[n % 32] as char);
        n = n / 32 + 7;
    }
    s
}

fn object(i: usize, name: &str, size: u64) -> NarInfo {
    NarInfo::parse(&format!(
        "StorePath: /nix/store/{}-{name}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1vn8cv29b1lzdb1pfpx4klpf2xja1iq8jbrvfk82f2ms1gc0gz4y\nNarSize: {size}\nReferences: \n",
        digest_of(i)
    ))
    .unwrap()
}

/// Every page of every order and search, walked with `after`, equals the same objects
/// sorted the slow way: the sparse and dense search paths and the seeks agree with it.
#[test]
fn pages_equal_a_full_sort_for_every_search_and_order() {
    let c = Catalog::default();
    let words = ["hello", "Glibc", "python3", "zlib", "HELLO-wrapper", "bash"];
    let mut all = Vec::new();
    for i in 0..600 {
        let name = format!("{}-{}", words[i % words.len()], i % 7);
        let size = (i as u64 * 7919) % 97; // many equal sizes: ties go by digest
        assert!(c.learn(&object(i, &name, size)));
        all.push((name, digest_of(i), size));
    }
    assert!(!c.learn(&object(3, "again", 1)), "known already");
    for q in [
        "",
        "hello",
        "LIB",
        "-3",
        "bash-6",
        "python3-1",
        "nothing",
        "h\nz",
    ] {
        for sort in [SortBy::Name, SortBy::Size] {
            let mut want: Vec<&(String, String, u64)> = all
                .iter()
                .filter(|(n, _, _)| n.to_lowercase().contains(&q.to_lowercase()))
                .collect();
            match sort {
                SortBy::Name => want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1))),
                SortBy::Size => {
                    want.sort_by(|a, b| (Reverse(a.2), &a.1).cmp(&(Reverse(b.2), &b.1)))
                }
            }
            let want: Vec<String> = want.iter().map(|w| w.1.clone()).collect();
            let mut got = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let p = c.page(q, sort, after.as_deref(), 37);
                assert_eq!(p.matching, want.len(), "{q:?} {sort:?}");
                assert_eq!(p.known, 600);
                got.extend(p.rows.iter().map(|r| r.digest.clone()));
                match p.next_after {
                    Some(a) => after = Some(a),
                    None => break,
                }
            }
            assert_eq!(got, want, "{q:?} {sort:?}");
        }
    }
}

#[test]
fn a_full_catalog_learns_nothing_more() {
    let c = Catalog::with_room(10);
    for i in 0..25 {
        c.learn(&object(i, "x", 1));
    }
    assert_eq!(c.len(), 10);
    assert!(c.is_full());
    assert!(c.page("", SortBy::Name, None, 100).full);
    assert_eq!(c.page("", SortBy::Size, None, 100).rows.len(), 10);
    assert!(c
        .unknown(vec![Digest::parse(&digest_of(99)).unwrap()])
        .is_empty());
    assert!(c
        .render_metrics()
        .contains("\nnixcached_catalog_objects 10\n"));
}
