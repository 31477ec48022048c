//! The compressions a binary cache uses for NARs: their names, file extensions and media types.
//! The streaming codecs are in [`crate::codec`] (feature `tokio`).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A NAR compression, as named in a narinfo's `Compression:` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Stored as is.
    None,
    /// xz (LZMA2).
    Xz,
    /// Zstandard.
    Zstd,
    /// bzip2; Nix's default when a narinfo has no `Compression:` line.
    Bzip2,
    /// gzip.
    Gzip,
    /// Brotli.
    Br,
}

/// Why a compression name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("unsupported compression {0:?}; use one of none, xz, zstd, bzip2, gzip, br")]
pub struct UnknownCompression(pub String);

impl Compression {
    /// Every supported compression, for tests and help texts.
    pub const ALL: [Compression; 6] = [
        Compression::None,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Gzip,
        Compression::Br,
    ];

    /// The narinfo name.
    pub const fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Gzip => "gzip",
            Compression::Br => "br",
        }
    }

    /// The file extension Nix appends after `.nar` (empty for none).
    pub const fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
            Compression::Gzip => ".gz",
            Compression::Br => ".br",
        }
    }

    /// The Content-Type a compressed NAR is served with.
    pub const fn mime(self) -> &'static str {
        match self {
            Compression::None => "application/x-nix-nar",
            Compression::Xz => "application/x-xz",
            Compression::Zstd => "application/zstd",
            Compression::Bzip2 => "application/x-bzip2",
            Compression::Gzip => "application/gzip",
            Compression::Br => "application/x-brotli",
        }
    }
}

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" | "" => Compression::None,
            "xz" => Compression::Xz,
            "zstd" => Compression::Zstd,
            "bzip2" => Compression::Bzip2,
            "gzip" => Compression::Gzip,
            "br" => Compression::Br,
            other => return Err(UnknownCompression(other.into())),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
