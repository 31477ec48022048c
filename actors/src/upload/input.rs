//! The input of `upload`: newline-separated store paths, as `send` (or anything else) writes
//! them, with an optional in-band finish marker (a line holding one NUL byte).

use crate::formats::{StoreDir, StorePath};

/// Longest line accepted; longer input is an error, not a silent truncation.
pub const MAX_LINE: usize = 64 * 1024;

/// What a chunk of input contained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// One line, without its terminator (`\n` or `\r\n`).
    Line(Vec<u8>),
    /// The finish marker: nothing after it is read.
    Finish,
}

/// Why input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// A line longer than [`MAX_LINE`].
    #[error("input line longer than {MAX_LINE} bytes; paths are one per line")]
    TooLong,
}

/// Splits a byte stream into lines, across reads of any size.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    allow_finish: bool,
    finished: bool,
}

impl LineSplitter {
    /// A splitter; with `allow_finish`, a NUL line ends the input.
    pub fn new(allow_finish: bool) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            allow_finish,
            finished: false,
        }
    }

    /// True once the finish marker was seen.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Feeds bytes; returns the complete tokens they finish.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Token>, InputError> {
        let mut out = Vec::new();
        if self.finished {
            return Ok(out);
        }
        self.buf.extend_from_slice(data);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if self.allow_finish && line == [0] {
                self.finished = true;
                self.buf.clear();
                out.push(Token::Finish);
                return Ok(out);
            }
            out.push(Token::Line(line));
        }
        if self.buf.len() > MAX_LINE {
            return Err(InputError::TooLong);
        }
        Ok(out)
    }

    /// End of input: a last line without terminator is still a line.
    pub fn finish(&mut self) -> Vec<Token> {
        if self.finished || self.buf.is_empty() {
            return Vec::new();
        }
        let mut line = std::mem::take(&mut self.buf);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        vec![Token::Line(line)]
    }
}

/// What to do with one input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A store object to upload.
    Path(StorePath),
    /// Blank: ignored silently.
    Blank,
    /// Not uploadable; the message says why (logged as a warning).
    Skip(String),
}

/// Validates one line as a store path in `dir`.
pub fn parse_line(dir: &StoreDir, line: &[u8]) -> Parsed {
    let Ok(text) = std::str::from_utf8(line) else {
        return Parsed::Skip(format!(
            "received non-UTF-8 input {:?}, skipping",
            String::from_utf8_lossy(line)
        ));
    };
    if text.trim().is_empty() {
        return Parsed::Blank;
    }
    // Tolerate what shells and humans add: trailing slashes.
    let cleaned = text.trim_end_matches('/');
    match dir.parse_path(cleaned) {
        Ok(p) if p.is_derivation() => {
            Parsed::Skip(format!("received store derivation path {text:?}, skipping"))
        }
        Ok(p) => Parsed::Path(p),
        Err(e) => Parsed::Skip(format!(
            "received invalid store path {text:?}, skipping: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], allow_finish: bool) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::new(allow_finish);
        let mut out = Vec::new();
        for t in s.push(input).unwrap().into_iter().chain(s.finish()) {
            match t {
                Token::Line(l) => out.push(l),
                Token::Finish => break,
            }
        }
        out
    }

    /// The original's TestScanLinesWithEOF table (with the Go ≥ 1.22 reading of `"\x00\n"`).
    #[test]
    fn original_framing_table() {
        let v = |xs: &[&str]| xs.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(lines(b"", true), v(&[]));
        assert_eq!(lines(b"\n", true), v(&[""]));
        assert_eq!(lines(b"\r\n", true), v(&[""]));
        assert_eq!(lines(b"\x00\n", true), v(&[]));
        assert_eq!(lines(b"foo", true), v(&["foo"]));
        assert_eq!(lines(b"foo\n", true), v(&["foo"]));
        assert_eq!(lines(b"foo\r\n", true), v(&["foo"]));
        assert_eq!(lines(b"foo\r\nbar", true), v(&["foo", "bar"]));
        assert_eq!(lines(b"foo\r\nbar\n", true), v(&["foo", "bar"]));
        assert_eq!(lines(b"foo\r\n\x00\r\n", true), v(&["foo"]));
        assert_eq!(lines(b"foo\r\n\x00\r\nbar\n", true), v(&["foo"]));
        // Without --allow-finish the marker is just a (bad) line.
        assert_eq!(lines(b"foo\n\x00\nbar\n", false), v(&["foo", "\0", "bar"]));
    }

    #[test]
    fn lines_split_across_reads_and_bounded() {
        let mut s = LineSplitter::new(false);
        assert!(s.push(b"/nix/st").unwrap().is_empty());
        assert_eq!(
            s.push(b"ore/x\n").unwrap(),
            vec![Token::Line(b"/nix/store/x".to_vec())]
        );
        assert_eq!(s.push(&vec![b'a'; MAX_LINE + 1]), Err(InputError::TooLong));
    }

    #[test]
    fn path_validation() {
        let d = StoreDir::default();
        assert!(matches!(
            parse_line(&d, b"/nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1"),
            Parsed::Path(_)
        ));
        assert!(matches!(
            parse_line(&d, b"/nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1/"),
            Parsed::Path(_)
        ));
        assert_eq!(parse_line(&d, b"   "), Parsed::Blank);
        for bad in [
            &b"/nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-x.drv"[..],
            b"relative",
            b" /nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1",
            b"/nix/store/5r1dlyl2wyar1nn50ry8xi6apps79m0j-dir1/bin/sh",
            b"/tmp/x",
            b"\xff",
        ] {
            assert!(matches!(parse_line(&d, bad), Parsed::Skip(_)), "{bad:?}");
        }
    }
}
