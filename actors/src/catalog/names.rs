//! Case-insensitive substring search over every name in the catalog.
//!
//! The names live lower-cased in one contiguous buffer, one per line, in the order objects
//! were learned (line `i` is object `i`). A search is then one `memmem` pass over a few bytes
//! per object, instead of lower-casing (and allocating) every name on every request.
//! Store-path names are ASCII (Nix allows `[A-Za-z0-9+-._?=]`), so ASCII case folding is
//! the whole of case folding here.

use memchr::memmem;

/// What a search looks for: the query folded to lower case.
#[derive(Debug, Clone)]
pub(super) struct Needle(Vec<u8>);

impl Needle {
    /// The needle of a query; `None` for the empty query, which matches everything.
    pub(super) fn new(q: &str) -> Option<Needle> {
        if q.is_empty() {
            return None;
        }
        // Unicode lower-casing first (the Kelvin sign folds to an ASCII `k`), then ASCII.
        Some(Needle(q.to_lowercase().into_bytes()))
    }

    /// Whether `name` contains the needle, ignoring ASCII case.
    pub(super) fn matches(&self, name: &str) -> bool {
        let n = &self.0;
        n.len() <= name.len()
            && name
                .as_bytes()
                .windows(n.len())
                .any(|w| w.eq_ignore_ascii_case(n))
    }

    /// A needle spanning a line break would match across two names: names never contain
    /// one, so such a needle matches nothing.
    fn spans_lines(&self) -> bool {
        self.0.contains(&b'\n')
    }
}

/// Every learned name, lower-cased, one per line, line `i` being object `i`.
#[derive(Debug, Default)]
pub(super) struct Names {
    hay: Vec<u8>,
}

impl Names {
    /// Appends the name of the next object.
    pub(super) fn push(&mut self, name: &str) {
        self.hay.extend(name.bytes().map(|b| match b {
            b'\n' => b' ',
            b => b.to_ascii_lowercase(),
        }));
        self.hay.push(b'\n');
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.hay.capacity()
    }

    /// How many names contain `needle`.
    pub(super) fn count(&self, needle: &Needle) -> usize {
        if needle.spans_lines() {
            return 0;
        }
        let finder = memmem::Finder::new(&needle.0);
        let mut count = 0;
        let mut pos = 0;
        while let Some(i) = finder.find(&self.hay[pos..]) {
            count += 1;
            // One count per name: go on from the end of this line.
            let after = pos + i + needle.0.len();
            pos = match memchr::memchr(b'\n', &self.hay[after..]) {
                Some(j) => after + j + 1,
                None => self.hay.len(),
            };
        }
        count
    }

    /// The objects whose names contain `needle`, in the order they were learned.
    pub(super) fn matching(&self, needle: &Needle) -> Vec<u32> {
        let mut out = Vec::new();
        if needle.spans_lines() {
            return out;
        }
        let finder = memmem::Finder::new(&needle.0);
        let (mut pos, mut line, mut counted_to) = (0, 0usize, 0);
        while let Some(i) = finder.find(&self.hay[pos..]) {
            let at = pos + i;
            line += memchr::memchr_iter(b'\n', &self.hay[counted_to..at]).count();
            counted_to = at;
            out.push(line as u32);
            let after = at + needle.0.len();
            pos = match memchr::memchr(b'\n', &self.hay[after..]) {
                Some(j) => after + j + 1,
                None => self.hay.len(),
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_finds_each_name_once_ignoring_case() {
        let mut n = Names::default();
        for name in [
            "Hello-2.12",
            "glibc-2.39",
            "hello-hello",
            "python3-3.12",
            "x",
        ] {
            n.push(name);
        }
        let q = Needle::new("HELLO").unwrap();
        assert_eq!(n.count(&q), 2);
        assert_eq!(n.matching(&q), [0, 2]);
        // python3-3.12 has three 3s and counts once.
        let three = Needle::new("3").unwrap();
        assert_eq!(n.count(&three), 2);
        assert_eq!(n.matching(&three), [1, 3]);
        assert_eq!(n.matching(&Needle::new("x").unwrap()), [4]);
        assert_eq!(n.count(&Needle::new("c-2\ng").unwrap()), 0);
        assert_eq!(n.count(&Needle::new("nothing").unwrap()), 0);
        assert!(Needle::new("").is_none());
        assert!(q.matches("say-hElLo"));
        assert!(!q.matches("hell"));
    }
}
