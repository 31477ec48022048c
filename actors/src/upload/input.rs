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
    /// The current line so far, while it may still fit (at most `MAX_LINE + 1` bytes: one
    /// more than a line may hold, since a last `\r` belongs to the terminator).
    buf: Vec<u8>,
    allow_finish: bool,
    finished: bool,
    /// Inside an oversized line: what [`Token::Oversized`] will report.
    skipping: Option<Skipping>,
}

#[derive(Debug)]
struct Skipping {
    /// The line's first 64 bytes.
    start: Vec<u8>,
    /// Bytes of the line so far, a last `\r` included.
    len: u64,
    /// Whether the last byte so far is `\r` (dropped from the length if a `\n` follows).
    last_cr: bool,
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

    /// Feeds bytes; returns the complete tokens they finish. The tokens do not depend on how
    /// the input is cut into reads; the splitter holds at most about [`MAX_LINE`] bytes
    /// between reads, and each byte is looked at a bounded number of times.
    pub fn push(&mut self, data: &[u8]) -> Vec<Token> {
        let mut out = Vec::new();
        let mut rest = data;
        while !self.finished && !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                None => {
                    self.extend(rest);
                    break;
                }
                Some(nl) => {
                    self.extend(&rest[..nl]);
                    out.push(self.end_line());
                    rest = &rest[nl + 1..];
                }
            }
        }
        out
    }

    /// End of input: a last line without terminator is still a line.
    pub fn finish(&mut self) -> Vec<Token> {
        if self.finished || (self.buf.is_empty() && self.skipping.is_none()) {
            return Vec::new();
        }
        match self.end_line() {
            // Only a terminated NUL line is the marker; at the end of input it is a line.
            Token::Finish => vec![Token::Line(vec![0])],
            t => vec![t],
        }
    }

    /// Adds bytes of the current line (no `\n` among them).
    fn extend(&mut self, part: &[u8]) {
        let Some(&last) = part.last() else {
            return;
        };
        if let Some(s) = &mut self.skipping {
            s.len += part.len() as u64;
            s.last_cr = last == b'\r';
        } else if self.buf.len() + part.len() > MAX_LINE + 1 {
            // Too long even without a last `\r`: keep its start and count the rest.
            let start = self.buf.iter().chain(part).take(64).copied().collect();
            let len = (self.buf.len() + part.len()) as u64;
            self.buf = Vec::new();
            self.skipping = Some(Skipping {
                start,
                len,
                last_cr: last == b'\r',
            });
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    /// The token of the current line, which just ended.
    fn end_line(&mut self) -> Token {
        if let Some(s) = self.skipping.take() {
            return Token::Oversized {
                start: s.start,
                len: s.len - u64::from(s.last_cr),
            };
        }
        let mut line = std::mem::take(&mut self.buf);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if self.allow_finish && line == [0] {
            self.finished = true;
            return Token::Finish;
        }
        if line.len() > MAX_LINE {
            return Token::Oversized {
                start: line[..64].to_vec(),
                len: line.len() as u64,
            };
        }
        Token::Line(line)
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
        // Only the `\r` of the terminator goes (a fuzz target's model once took two).
        assert_eq!(lines(b"foo\r\r\n\r\r", true), v(&["foo\r", "\r"]));
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

    /// Every way of cutting `input` into two reads, and byte-by-byte reads, give the tokens
    /// of one read.
    fn same_in_any_reads(input: &[u8], allow_finish: bool) -> Vec<Token> {
        let mut one = LineSplitter::new(allow_finish);
        let mut want = one.push(input);
        want.extend(one.finish());
        let step = (input.len() / 200).max(1);
        for cut in (0..=input.len()).step_by(step) {
            let mut s = LineSplitter::new(allow_finish);
            let mut got = s.push(&input[..cut]);
            got.extend(s.push(&input[cut..]));
            got.extend(s.finish());
            assert_eq!(got, want, "cut at {cut}");
        }
        want
    }

    /// Found with the line_splitter fuzz target's model: a line of MAX_LINE + 1 bytes was a
    /// Line when its newline came in the same read and Oversized otherwise; the `\r` of an
    /// oversized line's `\r\n` counted in its length when a read ended between the two.
    #[test]
    fn tokens_do_not_depend_on_read_sizes() {
        let just_over = [vec![b'a'; MAX_LINE + 1], b"\n".to_vec()].concat();
        assert_eq!(
            same_in_any_reads(&just_over, false),
            vec![Token::Oversized {
                start: vec![b'a'; 64],
                len: MAX_LINE as u64 + 1
            }]
        );
        let at_bound_crlf = [vec![b'b'; MAX_LINE], b"\r\n".to_vec()].concat();
        assert_eq!(
            same_in_any_reads(&at_bound_crlf, false),
            vec![Token::Line(vec![b'b'; MAX_LINE])]
        );
        let long_crlf = [vec![b'c'; 2 * MAX_LINE], b"\r\nx\n".to_vec()].concat();
        assert_eq!(
            same_in_any_reads(&long_crlf, false),
            vec![
                Token::Oversized {
                    start: vec![b'c'; 64],
                    len: 2 * MAX_LINE as u64
                },
                Token::Line(b"x".to_vec())
            ]
        );
        // Byte by byte, the `\r` ending one read and the `\n` the next.
        let mut s = LineSplitter::new(false);
        let mut got = Vec::new();
        for b in &long_crlf {
            got.extend(s.push(std::slice::from_ref(b)));
        }
        assert_eq!(got, same_in_any_reads(&long_crlf, false));
        let finish = b"a\r\n\0\r\nb\n";
        assert_eq!(
            same_in_any_reads(finish, true),
            vec![Token::Line(b"a".to_vec()), Token::Finish]
        );
    }

    /// One read holding many short lines is split in one pass (the splitter no longer shifts
    /// the rest of its buffer for each line, quadratic in the read's size), and it holds no
    /// more than about MAX_LINE between reads however large the reads are.
    #[test]
    fn large_reads_of_short_lines() {
        let mut s = LineSplitter::new(false);
        let read = [b"/nix/store/x\n".repeat(200_000), b"/nix/st".to_vec()].concat();
        assert_eq!(s.push(&read).len(), 200_000);
        // Before, the buffer kept the capacity of the whole read for the partial line.
        assert!(s.buf.capacity() <= MAX_LINE + 1, "{}", s.buf.capacity());
        assert_eq!(
            s.push(b"ore/y\n"),
            vec![Token::Line(b"/nix/store/y".to_vec())]
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
