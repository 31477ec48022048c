//! The compressions a binary cache uses for NARs, streaming in both directions.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;

use async_compression::tokio::bufread as dec;
use async_compression::tokio::bufread as benc;
use async_compression::tokio::write as enc;
use async_compression::Level;
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite};

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

    /// Wraps a compressed byte stream so that reading it yields the uncompressed bytes.
    pub fn decoder<'a, R>(self, input: R) -> Pin<Box<dyn AsyncRead + Send + 'a>>
    where
        R: AsyncBufRead + Send + 'a,
    {
        match self {
            Compression::None => Box::pin(input),
            Compression::Xz => {
                let mut d = dec::XzDecoder::new(input);
                d.multiple_members(true);
                Box::pin(d)
            }
            Compression::Zstd => {
                let mut d = dec::ZstdDecoder::new(input);
                d.multiple_members(true);
                Box::pin(d)
            }
            Compression::Bzip2 => {
                let mut d = dec::BzDecoder::new(input);
                d.multiple_members(true);
                Box::pin(d)
            }
            Compression::Gzip => {
                let mut d = dec::GzipDecoder::new(input);
                d.multiple_members(true);
                Box::pin(d)
            }
            Compression::Br => Box::pin(dec::BrotliDecoder::new(input)),
        }
    }

    /// Wraps a sink so that bytes written to it arrive compressed; `shutdown` finishes the frame.
    ///
    /// `level` is the codec's own scale (zstd 1-19, xz 0-9, …); `None` takes the codec's default,
    /// except for brotli whose maximum is far too slow for NARs, so it defaults to 5.
    pub fn encoder<'a, W>(
        self,
        output: W,
        level: Option<i32>,
    ) -> Pin<Box<dyn AsyncWrite + Send + 'a>>
    where
        W: AsyncWrite + Send + 'a,
    {
        let lvl = self.level(level);
        match self {
            Compression::None => Box::pin(output),
            Compression::Xz => Box::pin(enc::XzEncoder::with_quality(output, lvl)),
            Compression::Zstd => Box::pin(enc::ZstdEncoder::with_quality(output, lvl)),
            Compression::Bzip2 => Box::pin(enc::BzEncoder::with_quality(output, lvl)),
            Compression::Gzip => Box::pin(enc::GzipEncoder::with_quality(output, lvl)),
            Compression::Br => Box::pin(enc::BrotliEncoder::with_quality(output, lvl)),
        }
    }
}

impl Compression {
    /// Wraps an uncompressed byte source so that reading it yields compressed bytes; the pull
    /// form of [`Compression::encoder`], for pipelines that hand a stream onwards.
    pub fn compress_reader<'a, R>(
        self,
        input: R,
        level: Option<i32>,
    ) -> Pin<Box<dyn AsyncRead + Send + 'a>>
    where
        R: AsyncBufRead + Send + 'a,
    {
        let lvl = self.level(level);
        match self {
            Compression::None => Box::pin(input),
            Compression::Xz => Box::pin(benc::XzEncoder::with_quality(input, lvl)),
            Compression::Zstd => Box::pin(benc::ZstdEncoder::with_quality(input, lvl)),
            Compression::Bzip2 => Box::pin(benc::BzEncoder::with_quality(input, lvl)),
            Compression::Gzip => Box::pin(benc::GzipEncoder::with_quality(input, lvl)),
            Compression::Br => Box::pin(benc::BrotliEncoder::with_quality(input, lvl)),
        }
    }
}

impl Compression {
    /// The codec level for `level`; brotli's default (its maximum) is far too slow for NARs,
    /// so brotli defaults to 5.
    fn level(self, level: Option<i32>) -> Level {
        match (level, self) {
            (Some(l), _) => Level::Precise(l),
            (None, Compression::Br) => Level::Precise(5),
            (None, _) => Level::Default,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

    #[tokio::test]
    async fn every_codec_round_trips_a_stream() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
            .collect();
        for c in Compression::ALL {
            let mut out = Vec::new();
            let mut e = c.encoder(&mut out, None);
            for chunk in data.chunks(7777) {
                e.write_all(chunk).await.unwrap();
            }
            e.shutdown().await.unwrap();
            drop(e);
            if c != Compression::None {
                assert!(out.len() < data.len(), "{c} compresses");
            }
            let mut back = Vec::new();
            c.decoder(BufReader::new(&out[..]))
                .read_to_end(&mut back)
                .await
                .unwrap();
            assert!(back == data, "{c} round trip");
        }
    }

    #[tokio::test]
    async fn corrupt_input_is_an_error_not_garbage() {
        for c in Compression::ALL
            .into_iter()
            .filter(|c| *c != Compression::None)
        {
            let mut back = Vec::new();
            let r = c
                .decoder(BufReader::new(&b"definitely not compressed data"[..]))
                .read_to_end(&mut back)
                .await;
            assert!(r.is_err(), "{c} must reject garbage");
        }
    }
}
