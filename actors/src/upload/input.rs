//! The input of `upload`: newline-separated store paths, as `send` (or anything else) writes
//! them, with an optional in-band finish marker (a line holding one NUL byte).

use crate::formats::{StoreDir, StorePath};

/// Longest line accepted. A longer one is skipped whole (never truncated into a path) and
/// reported; the lines after it are read as usual.
pub const MAX_LINE: usize = 64 * 1024;

/// What a chunk of input contained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// One line, without its terminator (`\n` or `\r\n`).
    Line(Vec<u8>),
    /// The finish marker: nothing after it is read.
    Finish,
    /// A line longer than [`MAX_LINE`], skipped: its first bytes, and its whole length.
    Oversized {
        /// The line's first 64 bytes, to say in the log which line it was.
        start: Vec<u8>,
        /// Its length in bytes (without the terminator).
        len: u64,
    },
}

/// Splits a byte stream into lines, across reads of any size.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    allow_finish: bool,
    finished: bool,
    /// Inside an oversized line: its start and the bytes dropped so far, until its newline.
    skipping: Option<(Vec<u8>, u64)>,
}

impl LineSplitter {
    /// A splitter; with `allow_finish`, a NUL line ends the input.
    pub fn new(allow_finish: bool) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            allow_finish,
            finished: false,
            skipping: None,
        }
    }

    /// True once the finish marker was seen.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Feeds bytes; returns the complete tokens they finish. Memory stays within about
    /// [`MAX_LINE`] plus `data`, whatever the input.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<Token> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        if let Some((start, dropped)) = &mut self.skipping {
            match data.iter().position(|&b| b == b'\n') {
                None => {
                    *dropped += data.len() as u64;
                    return out;
                }
                Some(nl) => {
                    let len = *dropped + nl as u64 - u64::from(nl > 0 && data[nl - 1] == b'\r');
                    out.push(Token::Oversized {
                        start: std::mem::take(start),
                        len,
                    });
                    self.skipping = None;
                    data = &data[nl + 1..];
                }
            }
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
                return out;
            }
            out.push(Token::Line(line));
        }
        if self.buf.len() > MAX_LINE {
            let dropped = self.buf.len() as u64;
            self.buf.truncate(64);
            self.skipping = Some((std::mem::take(&mut self.buf), dropped));
        }
        out
    }

    /// End of input: a last line without terminator is still a line.
    pub fn finish(&mut self) -> Vec<Token> {
        if let Some((start, len)) = self.skipping.take() {
            return vec![Token::Oversized { start, len }];
        }
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
        for t in s.push(input).into_iter().chain(s.finish()) {
            match t {
                Token::Line(l) => out.push(l),
                Token::Finish => break,
                Token::Oversized { .. } => out.push(b"<oversized>".to_vec()),
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
        assert!(s.push(b"/nix/st").is_empty());
        assert_eq!(
            s.push(b"ore/x\n"),
            vec![Token::Line(b"/nix/store/x".to_vec())]
        );
        // A line past the bound is skipped whole, however it is split, and reading goes on.
        assert!(s.push(&vec![b'a'; MAX_LINE + 1]).is_empty());
        assert!(s.push(&vec![b'a'; 3 * MAX_LINE]).is_empty());
        assert!(s.buf.capacity() <= 2 * MAX_LINE + 2, "memory stays bounded");
        assert_eq!(
            s.push(b"aa\r\n/nix/store/y\n"),
            vec![
                Token::Oversized {
                    start: vec![b'a'; 64],
                    len: 4 * MAX_LINE as u64 + 3,
                },
                Token::Line(b"/nix/store/y".to_vec()),
            ]
        );
        // An oversized last line without a terminator is reported at the end too.
        assert!(s.push(&vec![b'b'; MAX_LINE + 10]).is_empty());
        assert_eq!(
            s.finish(),
            vec![Token::Oversized {
                start: vec![b'b'; 64],
                len: MAX_LINE as u64 + 10,
            }]
        );
        assert_eq!(
            lines(b"x\n\nz", false),
            vec![b"x".to_vec(), vec![], b"z".to_vec()]
        );
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
