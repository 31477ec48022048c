//! The FIFO line framing of `upload`: cutting the same bytes into reads of any sizes gives
//! the same tokens, the tokens are what the documented rules say (lines without `\n`/`\r\n`,
//! a NUL line as the finish marker, lines over MAX_LINE reported as oversized with their true
//! length), and the splitter keeps no more than about MAX_LINE plus one read in memory.
//! Inputs are built from runs, so lines far longer than the fuzzer's input size are reached.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nixcached_actors::formats::StoreDir;
use nixcached_actors::upload::input::{parse_line, LineSplitter, Token, MAX_LINE};
use nixcached_fuzz::live_heap;

#[derive(Arbitrary, Debug)]
enum Piece {
    Bytes(Vec<u8>),
    Run { byte: u8, len: u32 },
    Newline,
    CrLf,
    Finish,
}

#[derive(Arbitrary, Debug)]
struct Input {
    allow_finish: bool,
    pieces: Vec<Piece>,
    /// Read sizes, cycled.
    reads: Vec<u32>,
}

const MAX_DATA: usize = 256 << 10;

/// The tokens the rules give for the whole input.
fn model(data: &[u8], allow_finish: bool) -> Vec<Token> {
    let mut out = Vec::new();
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let last = lines.pop().unwrap_or_default();
    // Exactly one `\r` before the end of a line belongs to its terminator (also at the end
    // of the input), as with Go's ScanLines.
    let strip = |l: &'_ [u8]| l.strip_suffix(b"\r").unwrap_or(l).to_vec();
    let token = |l: Vec<u8>| {
        if l.len() > MAX_LINE {
            Token::Oversized {
                start: l[..64].to_vec(),
                len: l.len() as u64,
            }
        } else {
            Token::Line(l)
        }
    };
    for l in lines {
        let l = strip(l);
        if allow_finish && l == [0] {
            out.push(Token::Finish);
            return out;
        }
        out.push(token(l));
    }
    if !last.is_empty() {
        out.push(token(strip(last)));
    }
    out
}

fuzz_target!(|input: Input| {
    let mut data = Vec::new();
    for p in &input.pieces {
        match p {
            Piece::Bytes(b) => data.extend_from_slice(b),
            Piece::Run { byte, len } => {
                data.resize(data.len() + (*len as usize % (2 * MAX_LINE + 10)), *byte)
            }
            Piece::Newline => data.push(b'\n'),
            Piece::CrLf => data.extend_from_slice(b"\r\n"),
            Piece::Finish => data.extend_from_slice(b"\0\n"),
        }
        if data.len() > MAX_DATA {
            break;
        }
    }

    let mut whole = LineSplitter::new(input.allow_finish);
    let mut expected = whole.push(&data);
    expected.extend(whole.finish());
    assert_eq!(
        expected,
        model(&data, input.allow_finish),
        "splitter departs from the rules"
    );

    let mut split = LineSplitter::new(input.allow_finish);
    let mut got = Vec::new();
    let mut reads = input
        .reads
        .iter()
        .map(|&r| 1 + r as usize % (3 * MAX_LINE))
        .cycle();
    let mut rest = &data[..];
    let mut largest = 0;
    while !rest.is_empty() {
        let n = reads.next().unwrap_or(rest.len()).min(rest.len());
        largest = largest.max(n);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        got.extend(split.push(chunk));
    }
    got.extend(split.finish());
    assert_eq!(got, expected, "chunking changed the tokens");

    // Again, dropping the tokens at once: what the splitter itself holds between reads.
    let base = live_heap();
    let mut split = LineSplitter::new(input.allow_finish);
    let mut rest = &data[..];
    let mut reads = input
        .reads
        .iter()
        .map(|&r| 1 + r as usize % (3 * MAX_LINE))
        .cycle();
    while !rest.is_empty() {
        let n = reads.next().unwrap_or(rest.len()).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        drop(split.push(chunk));
        let held = live_heap().saturating_sub(base);
        assert!(
            held <= 2 * (MAX_LINE + largest) + 4096,
            "splitter holds {held} bytes after a read of {n} (largest {largest})"
        );
    }

    let dir = StoreDir::default();
    for t in &got {
        if let Token::Line(l) = t {
            let _ = parse_line(&dir, l);
        }
    }
});
