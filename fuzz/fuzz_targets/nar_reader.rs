//! The streaming NAR reader on raw bytes. For every NAR it accepts: an independent writer
//! gives back exactly the bytes read, every file's `narOffset`/`size` in the listing points at
//! the contents the visitor was given, the visitor saw the listing's tree, the NarSize bound
//! is exact, the `.ls` JSON of the listing reads back equal, and the reader's heap stays
//! within a small multiple of the input.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use nixcached_formats::nar::{self, Listing, NarError};
use nixcached_fuzz::{all_utf8, files, kinds, nar_of, peak_heap, Collected};

fuzz_target!(|data: &[u8]| {
    let mut consumed = 0usize;
    let counting = CountingReader {
        inner: data,
        n: &mut consumed,
    };
    let (first, heap) = peak_heap(|| nar::read(counting, &mut ()));
    // Every node costs at least ~100 bytes of input; 64 bytes of heap per input byte plus a
    // token buffer is far above what a correct reader needs and far below a runaway one.
    assert!(
        heap <= 64 * data.len() + (64 << 10),
        "reader held {heap} bytes of heap for {} bytes of input",
        data.len()
    );
    let mut seen = Collected::default();
    let second = nar::read(data, &mut seen);
    let listing = match (first, second) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "two passes gave different listings");
            a
        }
        (Err(_), Err(_)) => return,
        (a, b) => panic!("passes disagree: {a:?} vs {b:?}"),
    };
    let read = &data[..consumed];

    // Reader and writer agree.
    let contents = seen.contents();
    assert_eq!(
        nar_of(&listing.root, &contents),
        read,
        "write(read(x)) != x"
    );

    // Offsets and sizes point at the contents.
    let fs = files(&listing.root);
    assert_eq!(
        fs.len(),
        contents.len(),
        "listing and visitor disagree on files"
    );
    for (path, size, offset) in fs {
        let end = offset.checked_add(size).expect("extent fits") as usize;
        assert!(end <= read.len(), "file extent past the NAR's end");
        assert_eq!(&read[offset as usize..end], &contents[&path][..]);
    }
    // The visitor was told of each node once, in NAR order.
    let told: Vec<_> = seen
        .events
        .iter()
        .map(|(p, k, _)| (p.clone(), *k))
        .collect();
    assert_eq!(told, kinds(&listing.root), "visitor and listing disagree");

    // NarSize is the exact bound: the NAR's own length passes, one byte less is refused.
    assert_eq!(
        nar::read_at_most(read, &mut (), read.len() as u64).expect("fits its own size"),
        listing
    );
    assert!(matches!(
        nar::read_at_most(read, &mut (), read.len() as u64 - 1),
        Err(NarError::TooLong(_))
    ));

    // The listing survives its JSON form when JSON can carry its names.
    if all_utf8(&listing.root) {
        let json = listing.to_json();
        let back = Listing::from_json(&json).expect("our JSON reads back");
        assert_eq!(back, listing);
        assert_eq!(back.to_json(), json);
    }
});

/// Counts the bytes the reader took, to know where the NAR ended.
struct CountingReader<'a> {
    inner: &'a [u8],
    n: &'a mut usize,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        *self.n += k;
        Ok(k)
    }
}
