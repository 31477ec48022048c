//! Streaming codecs for every [`Compression`], over tokio's async I/O (feature `tokio`).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use async_compression::tokio::bufread as dec;
use async_compression::tokio::bufread as benc;
use async_compression::tokio::write as enc;
use async_compression::Level;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::compression::Compression;

/// Why a [`Compression::decoder_within`] stopped: the stream asks for a bigger window (the
/// history a decoder must keep) than the reader allows. Carried inside the `io::Error`.
#[derive(Debug, Error)]
#[error(
    "the {compression} stream needs a decoder window of more than {} MiB, which this server \
     does not spend on one reader (it was compressed with an unusually large window: zstd \
     --long or --ultra, xz -7 to -9)",
    limit >> 20
)]
pub struct WindowTooLarge {
    /// The stream's compression.
    pub compression: Compression,
    /// The largest window allowed, in bytes.
    pub limit: u64,
}

/// What liblzma and zstd say when a stream needs more memory than their limit.
const LIMIT_MESSAGES: [&str; 2] = [
    "memory limit reached",
    "Frame requires too much memory for decoding",
];

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

    /// [`Compression::decoder`] with the decoder's window bounded by `window` bytes (rounded
    /// down to a power of two): a stream that needs more fails with [`WindowTooLarge`] when
    /// its header is read, before the decoder allocates it.
    ///
    /// zstd and xz carry their window in the stream, up to 2 GiB (zstd) and 1.5 GiB (xz),
    /// and a decoder allocates it whole; gzip's is 32 KiB, bzip2 needs at most 3.6 MiB and
    /// brotli's window is at most 16 MiB, so only zstd and xz are capped.
    pub fn decoder_within<'a, R>(self, input: R, window: u64) -> Pin<Box<dyn AsyncRead + Send + 'a>>
    where
        R: AsyncBufRead + Send + 'a,
    {
        let log = 63 - window.max(1 << 10).leading_zeros();
        let inner: Pin<Box<dyn AsyncRead + Send + 'a>> = match self {
            Compression::Xz => {
                // liblzma's limit counts the whole decoder, which is the dictionary and
                // under 100 KiB besides.
                let mut d = dec::XzDecoder::with_mem_limit(input, (1u64 << log) + (1 << 20));
                d.multiple_members(true);
                Box::pin(d)
            }
            Compression::Zstd => {
                let params = [async_compression::zstd::DParameter::window_log_max(log)];
                let mut d = dec::ZstdDecoder::with_params(input, &params);
                d.multiple_members(true);
                Box::pin(d)
            }
            other => return other.decoder(input),
        };
        Box::pin(Capped {
            inner,
            compression: self,
            limit: 1 << log,
        })
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

/// Bytes handed to an encoder per write by [`Compression::compress_stream`].
const FEED: usize = 128 * 1024;

/// A sink the encoder writes into and the stream takes from between input chunks.
#[derive(Clone, Default)]
struct SharedSink(Arc<Mutex<Vec<u8>>>);

impl SharedSink {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().expect("sink"))
    }
}

impl AsyncWrite for SharedSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.lock().expect("sink").extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Compression {
    /// Compresses a byte stream, the codec flushed only at its end: the output depends only
    /// on the input bytes and the level, never on how the input was split or paced, so the
    /// same NAR gives the same file (and FileHash) every time, as small as the codec makes it.
    ///
    /// [`Compression::compress_reader`] flushes whenever its input is not ready, which suits
    /// a live response but not a file that is meant to be reproducible.
    pub fn compress_stream<'a, S>(
        self,
        input: S,
        level: Option<i32>,
    ) -> BoxStream<'a, io::Result<Bytes>>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'a,
    {
        if self == Compression::None {
            return input.boxed();
        }
        let sink = SharedSink::default();
        let encoder = self.encoder(sink.clone(), level);
        let state = (
            input.boxed(),
            encoder,
            sink,
            Vec::with_capacity(FEED),
            false,
        );
        futures::stream::try_unfold(
            state,
            |(mut input, mut encoder, sink, mut pending, ended)| async move {
                if ended {
                    return Ok(None);
                }
                loop {
                    // The encoder sees writes of exactly FEED bytes whatever the input's
                    // pieces (some codecs, brotli among them, emit blocks per write), and
                    // writing into the sink never waits, so nothing but the bytes decides
                    // where blocks end; nothing here asks the codec to flush.
                    let ended = match input.next().await {
                        Some(chunk) => {
                            let mut chunk = &chunk?[..];
                            while !chunk.is_empty() {
                                let n = chunk.len().min(FEED - pending.len());
                                pending.extend_from_slice(&chunk[..n]);
                                chunk = &chunk[n..];
                                if pending.len() == FEED {
                                    encoder.write_all(&pending).await?;
                                    pending.clear();
                                }
                            }
                            false
                        }
                        None => {
                            encoder.write_all(&pending).await?;
                            encoder.shutdown().await?;
                            true
                        }
                    };
                    let out = sink.take();
                    if !out.is_empty() || ended {
                        return Ok(Some((
                            Bytes::from(out),
                            (input, encoder, sink, pending, ended),
                        )));
                    }
                }
            },
        )
        .try_filter(|b| futures::future::ready(!b.is_empty()))
        .boxed()
    }
}

impl Compression {
    /// The codec level for `level`. Unset, each codec gets the level Nix uses, so the files
    /// match `nix copy`'s in size: xz 6 and bzip2 9 (the codec crates would pick 5 and 6),
    /// zstd 3 and gzip 6 (their defaults). Brotli's maximum, Nix's choice, is far too slow
    /// for NARs, so brotli defaults to 5.
    fn level(self, level: Option<i32>) -> Level {
        match (level, self) {
            (Some(l), _) => Level::Precise(l),
            (None, Compression::Xz) => Level::Precise(6),
            (None, Compression::Bzip2) => Level::Precise(9),
            (None, Compression::Br) => Level::Precise(5),
            (None, _) => Level::Default,
        }
    }
}

/// A capped decoder, whose limit errors become [`WindowTooLarge`].
struct Capped<'a> {
    inner: Pin<Box<dyn AsyncRead + Send + 'a>>,
    compression: Compression,
    limit: u64,
}

impl AsyncRead for Capped<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.inner.as_mut().poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e))
                if LIMIT_MESSAGES.iter().any(|m| e.to_string().contains(m)) =>
            {
                std::task::Poll::Ready(Err(std::io::Error::other(WindowTooLarge {
                    compression: self.compression,
                    limit: self.limit,
                })))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::compression::Compression;
    use futures::{StreamExt, TryStreamExt};
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

    /// Text-like bytes that compress, but not trivially.
    fn sample(n: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefghij /\n0123"[(x % 17) as usize]
            })
            .collect()
    }

    /// `data` in pieces of `piece` bytes, each after a yield (the input was not ready), as a
    /// NAR arrives from a store.
    fn paced(
        data: &[u8],
        piece: usize,
    ) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        let chunks: Vec<bytes::Bytes> = data
            .chunks(piece)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        futures::stream::iter(chunks).then(|c| async move {
            tokio::task::yield_now().await;
            Ok(c)
        })
    }

    #[tokio::test]
    async fn compressed_streams_depend_only_on_the_bytes() {
        let data = sample(2 << 20);
        for c in Compression::ALL {
            let mut outputs = Vec::new();
            for piece in [data.len(), 128 * 1024, 7777, 1000] {
                let parts: Vec<bytes::Bytes> = c
                    .compress_stream(paced(&data, piece), None)
                    .try_collect()
                    .await
                    .unwrap();
                outputs.push((piece, parts.concat()));
            }
            let (_, first) = &outputs[0];
            for (piece, out) in &outputs[1..] {
                assert!(
                    out == first,
                    "{c}: {piece}-byte pieces gave {} bytes, one piece {}",
                    out.len(),
                    first.len()
                );
            }
            let mut back = Vec::new();
            c.decoder(BufReader::new(&first[..]))
                .read_to_end(&mut back)
                .await
                .unwrap();
            assert!(back == data, "{c} round trip");
        }
        // An error in the input ends the output with that error.
        let failing = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"x")),
            Err(std::io::Error::other("source failed")),
        ]);
        let r: Result<Vec<_>, _> = Compression::Xz
            .compress_stream(failing, None)
            .try_collect()
            .await;
        assert_eq!(r.unwrap_err().to_string(), "source failed");
    }

    /// A window over the cap is refused with [`WindowTooLarge`]; one within it decodes.
    #[tokio::test]
    async fn decoder_windows_are_capped() {
        use super::WindowTooLarge;
        use async_compression::tokio::write::{XzEncoder, ZstdEncoder};
        use async_compression::zstd::CParameter;
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        // zstd with a 16 MiB window (level 19 and --long use such), xz -9 (64 MiB dictionary).
        let mut zstd = ZstdEncoder::with_quality_and_params(
            Vec::new(),
            async_compression::Level::Precise(3),
            &[CParameter::window_log(24)],
        );
        zstd.write_all(&data).await.unwrap();
        zstd.shutdown().await.unwrap();
        let mut xz = XzEncoder::with_quality(Vec::new(), async_compression::Level::Precise(9));
        xz.write_all(&data).await.unwrap();
        xz.shutdown().await.unwrap();
        for (c, bytes) in [
            (Compression::Zstd, zstd.into_inner()),
            (Compression::Xz, xz.into_inner()),
        ] {
            let mut back = Vec::new();
            let e = c
                .decoder_within(BufReader::new(&bytes[..]), 8 << 20)
                .read_to_end(&mut back)
                .await
                .expect_err("window over the cap");
            let why = e.get_ref().and_then(|e| e.downcast_ref::<WindowTooLarge>());
            assert!(why.is_some(), "{c}: {e}");
            let mut back = Vec::new();
            c.decoder_within(BufReader::new(&bytes[..]), 64 << 20)
                .read_to_end(&mut back)
                .await
                .unwrap();
            assert!(back == data, "{c} within a large enough cap");
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
