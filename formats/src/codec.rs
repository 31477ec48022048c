//! Streaming codecs for every [`Compression`], over tokio's async I/O (feature `tokio`).

use std::pin::Pin;

use async_compression::tokio::bufread as dec;
use async_compression::tokio::bufread as benc;
use async_compression::tokio::write as enc;
use async_compression::Level;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite};

use crate::compression::Compression;

impl Compression {
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

#[cfg(test)]
mod tests {
    use crate::compression::Compression;
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
