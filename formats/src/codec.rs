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
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt};

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
