//! The legacy `nix-store --serve` wire protocol: framing, the handshake, and the requests and
//! answers of the commands this store uses.
//!
//! Everything is a little-endian `u64` or a string (`u64` length, bytes, zero padding to a
//! multiple of 8); a set is a count followed by that many strings. The protocol is strictly
//! one request, then its answer, on one pipe. NARs travel raw (not framed) after the request
//! that announces their size.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What the client sends first.
pub const CLIENT_MAGIC: u64 = 0x390c_9deb;
/// What a `nix-store --serve` answers before its version.
pub const SERVER_MAGIC: u64 = 0x5452_eecb;
/// The protocol version this client speaks (2.6: narinfo fields in `QueryPathInfos`).
pub const CLIENT_VERSION: u64 = 0x206;
/// Separates a NAR from its metadata in the `nix-store --export` format.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Oldest server minor version that sends NAR hashes, CAs and signatures with path infos.
pub const MIN_SERVER_MINOR: u64 = 4;
/// Oldest server minor version that has `AddToStoreNar`.
pub const ADD_TO_STORE_NAR_MINOR: u64 = 5;

/// Longest string accepted from the server (store paths, hashes, signatures, CAs).
const MAX_STRING: u64 = 64 * 1024;
/// Most elements accepted in one set; a whole store's listing fits.
const MAX_SET: u64 = 1 << 24;

/// The serve commands this store sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Command {
    /// `cmdQueryValidPaths`: which of these paths are valid.
    QueryValidPaths = 1,
    /// `cmdQueryPathInfos`: metadata of the valid ones among these paths.
    QueryPathInfos = 2,
    /// `cmdDumpStorePath`: the NAR of one path.
    DumpStorePath = 3,
    /// `cmdImportPaths`: paths in `nix-store --export` format (any server).
    ImportPaths = 4,
    /// `cmdAddToStoreNar`: one path with its full metadata (serve protocol 2.5 and later).
    AddToStoreNar = 9,
}

/// The major part of a protocol version (`0x200` for every serve protocol so far).
pub const fn major(version: u64) -> u64 {
    version & 0xff00
}

/// The minor part of a protocol version.
pub const fn minor(version: u64) -> u64 {
    version & 0x00ff
}

/// A request being encoded; requests are small and sent whole, NARs follow separately.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frame(Vec<u8>);

impl Frame {
    /// A request starting with `cmd`.
    pub fn command(cmd: Command) -> Frame {
        Frame::default().u64(cmd as u64)
    }

    /// Appends a number.
    pub fn u64(mut self, n: u64) -> Frame {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }

    /// Appends a string.
    pub fn str(mut self, s: &str) -> Frame {
        self = self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        let pad = (8 - s.len() % 8) % 8;
        self.0.extend_from_slice(&[0u8; 8][..pad]);
        self
    }

    /// Appends a set of strings.
    pub fn strs<S: AsRef<str>>(mut self, items: &[S]) -> Frame {
        self = self.u64(items.len() as u64);
        for i in items {
            self = self.str(i.as_ref());
        }
        self
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

fn bad_data(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads a number.
pub async fn read_u64<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).await?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a string, refusing lengths no store path, hash or signature could have.
pub async fn read_string<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<String> {
    let n = read_u64(r).await?;
    if n > MAX_STRING {
        return Err(bad_data(format!(
            "the server sent a {n}-byte string where at most {MAX_STRING} make sense"
        )));
    }
    let padded = n.div_ceil(8) * 8;
    let mut buf = vec![0u8; padded as usize];
    r.read_exact(&mut buf).await?;
    if buf[n as usize..].iter().any(|&b| b != 0) {
        return Err(bad_data("non-zero string padding from the server".into()));
    }
    buf.truncate(n as usize);
    String::from_utf8(buf).map_err(|_| bad_data("a string from the server is not UTF-8".into()))
}

/// Reads a set of strings.
pub async fn read_strings<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<String>> {
    let n = read_u64(r).await?;
    if n > MAX_SET {
        return Err(bad_data(format!(
            "the server announced a set of {n} strings"
        )));
    }
    // The count is the peer's word, not a promise: grow as strings really arrive.
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        out.push(read_string(r).await?);
    }
    Ok(out)
}

/// The greeting: magic and our version, sent together.
pub fn hello() -> Frame {
    Frame::default().u64(CLIENT_MAGIC).u64(CLIENT_VERSION)
}

/// Why the server's greeting was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HelloError {
    /// Something other than a serve protocol answered; the bytes seen, for the message.
    NotServe(Vec<u8>),
    /// A serve protocol this client cannot speak.
    Version(u64),
}

/// Reads the server's greeting; returns its protocol version. An I/O error (typically the
/// end of the stream because ssh or `nix-store` failed) is the outer error.
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Result<u64, HelloError>> {
    let mut b = [0u8; 16];
    r.read_exact(&mut b[..8]).await?;
    if u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) != SERVER_MAGIC {
        // Most likely text printed by the remote shell's start-up files: show a little more.
        let n = tokio::time::timeout(std::time::Duration::from_millis(200), r.read(&mut b[8..]))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        return Ok(Err(HelloError::NotServe(b[..8 + n].to_vec())));
    }
    let version = read_u64(r).await?;
    if major(version) != 0x200 || minor(version) < MIN_SERVER_MINOR {
        return Ok(Err(HelloError::Version(version)));
    }
    Ok(Ok(version))
}

/// Metadata of a store path as the serve protocol carries it: full paths, empty strings for
/// "none", the NAR hash as `sha256:<nixbase32>` (answers) or base16 (requests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathInfo {
    /// The store path.
    pub path: String,
    /// The deriver's store path, or empty.
    pub deriver: String,
    /// Full store paths of the references.
    pub references: Vec<String>,
    /// The NAR's size.
    pub nar_size: u64,
    /// The NAR's hash.
    pub nar_hash: String,
    /// Content address (`fixed:r:sha256:…`), or empty.
    pub ca: String,
    /// Signatures, `name:base64`.
    pub sigs: Vec<String>,
}

/// `QueryValidPaths` without locking or substituting.
pub fn query_valid_paths<S: AsRef<str>>(paths: &[S]) -> Frame {
    Frame::command(Command::QueryValidPaths)
        .u64(0)
        .u64(0)
        .strs(paths)
}

/// `QueryPathInfos`.
pub fn query_path_infos<S: AsRef<str>>(paths: &[S]) -> Frame {
    Frame::command(Command::QueryPathInfos).strs(paths)
}

/// Reads the answer to `QueryPathInfos`: one record per valid path, then an empty path.
pub async fn read_path_infos<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<PathInfo>> {
    let mut out = Vec::new();
    loop {
        let path = read_string(r).await?;
        if path.is_empty() {
            return Ok(out);
        }
        let deriver = read_string(r).await?;
        let references = read_strings(r).await?;
        let _download_size = read_u64(r).await?;
        let nar_size = read_u64(r).await?;
        let nar_hash = read_string(r).await?;
        let ca = read_string(r).await?;
        let sigs = read_strings(r).await?;
        out.push(PathInfo {
            path,
            deriver,
            references,
            nar_size,
            nar_hash,
            ca,
            sigs,
        });
    }
}

/// `DumpStorePath`; the answer is the raw NAR, exactly `narSize` bytes.
pub fn dump_store_path(path: &str) -> Frame {
    Frame::command(Command::DumpStorePath).str(path)
}

/// The head of `AddToStoreNar`; the raw NAR of `info.nar_size` bytes follows, then the server
/// answers 1. `info.nar_hash` is what the server checks the NAR against.
pub fn add_to_store_nar(info: &PathInfo) -> Frame {
    Frame::command(Command::AddToStoreNar)
        .str(&info.path)
        .str(&info.deriver)
        .str(&info.nar_hash)
        .strs(&info.references)
        .u64(0) // registration time: the server's clock
        .u64(info.nar_size)
        .u64(0) // not "ultimate": it was not built there
        .strs(&info.sigs)
        .str(&info.ca)
}

/// The head of `ImportPaths` for one path: the raw NAR follows, then [`import_paths_tail`].
pub fn import_paths_head() -> Frame {
    Frame::command(Command::ImportPaths).u64(1)
}

/// What follows the NAR in `ImportPaths`: the export trailer (no signature) and the end of the
/// list. The format has no hash, size, signatures or CA: the server hashes what it got.
pub fn import_paths_tail(info: &PathInfo) -> Frame {
    Frame::default()
        .u64(EXPORT_MAGIC)
        .str(&info.path)
        .strs(&info.references)
        .str(&info.deriver)
        .u64(0) // no legacy signature
        .u64(0) // no more paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(n: u64) -> Vec<u8> {
        n.to_le_bytes().to_vec()
    }

    #[test]
    fn strings_are_length_prefixed_and_padded_to_8() {
        let f = Frame::default().str("").str("abc").str("12345678");
        let mut want = le(0);
        want.extend(le(3));
        want.extend(b"abc\0\0\0\0\0");
        want.extend(le(8));
        want.extend(b"12345678");
        assert_eq!(f.bytes(), &want[..]);
    }

    #[test]
    fn requests_encode_as_nix_expects() {
        let f = query_valid_paths(&["/nix/store/a"]);
        let mut want = le(1);
        want.extend(le(0)); // lock
        want.extend(le(0)); // substitute
        want.extend(le(1));
        want.extend(le(12));
        want.extend(b"/nix/store/a\0\0\0\0");
        assert_eq!(f.bytes(), &want[..]);
        assert_eq!(hello().bytes(), [le(0x390c9deb), le(0x206)].concat());
        assert_eq!(
            dump_store_path("/x").bytes(),
            [le(3), le(2), b"/x\0\0\0\0\0\0".to_vec()].concat()
        );
    }

    fn sample() -> PathInfo {
        PathInfo {
            path: "/nix/store/p".into(),
            deriver: "/nix/store/d.drv".into(),
            references: vec!["/nix/store/r".into()],
            nar_size: 1234,
            nar_hash: "ab".repeat(32),
            ca: String::new(),
            sigs: vec!["k:s".into()],
        }
    }

    #[test]
    fn add_to_store_nar_and_export_trailer_layout() {
        let i = sample();
        let want = Frame::default()
            .u64(9)
            .str(&i.path)
            .str(&i.deriver)
            .str(&i.nar_hash)
            .u64(1)
            .str("/nix/store/r")
            .u64(0)
            .u64(1234)
            .u64(0)
            .u64(1)
            .str("k:s")
            .str("");
        assert_eq!(add_to_store_nar(&i), want);
        assert_eq!(import_paths_head().bytes(), [le(4), le(1)].concat());
        let mut tail = le(0x4558494e);
        tail.extend(Frame::default().str("/nix/store/p").bytes());
        tail.extend(le(1));
        tail.extend(Frame::default().str("/nix/store/r").bytes());
        tail.extend(Frame::default().str("/nix/store/d.drv").bytes());
        tail.extend(le(0));
        tail.extend(le(0));
        assert_eq!(import_paths_tail(&i).bytes(), &tail[..]);
    }

    #[tokio::test]
    async fn path_infos_decode_until_the_empty_path() {
        let i = sample();
        let answer = Frame::default()
            .str(&i.path)
            .str(&i.deriver)
            .strs(&i.references)
            .u64(999) // download size, ignored
            .u64(i.nar_size)
            .str(&i.nar_hash)
            .str(&i.ca)
            .strs(&i.sigs)
            .str("");
        let got = read_path_infos(&mut answer.bytes()).await.unwrap();
        assert_eq!(got, vec![i]);
        assert!(read_path_infos(&mut &answer.bytes()[..20]).await.is_err());
    }

    #[tokio::test]
    async fn hostile_answers_are_refused_without_allocating() {
        let huge = Frame::default().u64(u64::MAX);
        assert!(read_string(&mut huge.bytes()).await.is_err());
        assert!(read_strings(&mut huge.bytes()).await.is_err());
        let bad_pad = [le(1), b"a\x01\0\0\0\0\0\0".to_vec()].concat();
        assert!(read_string(&mut &bad_pad[..]).await.is_err());
        let not_utf8 = [le(1), b"\xff\0\0\0\0\0\0\0".to_vec()].concat();
        assert!(read_string(&mut &not_utf8[..]).await.is_err());
    }

    #[tokio::test]
    async fn hello_checks_magic_and_version() {
        let ok = Frame::default().u64(SERVER_MAGIC).u64(0x207);
        assert_eq!(read_hello(&mut ok.bytes()).await.unwrap(), Ok(0x207));
        let old = Frame::default().u64(SERVER_MAGIC).u64(0x203);
        assert_eq!(
            read_hello(&mut old.bytes()).await.unwrap(),
            Err(HelloError::Version(0x203))
        );
        let shell_noise = b"Welcome to the host!\n";
        assert_eq!(
            read_hello(&mut &shell_noise[..]).await.unwrap(),
            Err(HelloError::NotServe(shell_noise[..16].to_vec()))
        );
        assert!(read_hello(&mut &b""[..]).await.is_err());
        assert_eq!(major(0x207), 0x200);
        assert_eq!(minor(0x207), 7);
    }
}
