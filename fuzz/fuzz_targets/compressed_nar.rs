//! Compressed NARs as a bucket or upstream hands them over: the first byte picks the codec and
//! the mode, the rest is the stream.
//!
//! - Raw mode (top bit clear): the rest is decoded the way serve decodes a NAR (a decoder with
//!   a bounded window, output capped like `NarSize`) and the output goes through the NAR
//!   reader. Properties: no panic; the heap stays within the window plus the codecs' fixed
//!   state, whatever window the stream asks for; decoding is deterministic.
//! - Round-trip mode (top bit set): the rest is compressed with the upload path's encoder and
//!   decoded again, which must give back exactly the input, for every codec.
#![no_main]

use std::io;
use std::pin::Pin;

use futures::executor::block_on;
use futures::TryStreamExt;
use libfuzzer_sys::fuzz_target;
use nixcached_formats::nar;
use nixcached_formats::Compression;
use nixcached_fuzz::peak_heap;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

/// The decoder window the target allows; serve allows 8 MiB, and the bound's arithmetic is the
/// same at any size, so a smaller one keeps executions fast.
const WINDOW: u64 = 1 << 20;
/// Decompressed bytes read at most, as serve reads at most `NarSize`.
const OUT_CAP: u64 = 256 << 10;
/// Longest input compressed and decoded again in round-trip mode.
const ROUND_TRIP_MAX: usize = 4096;
/// The codecs' own state besides the window: bzip2 needs up to 3.6 MiB, brotli's window is
/// fixed by the format at up to 16 MiB, buffers are small.
const CODEC_STATE: usize = 24 << 20;

fn drain(mut r: Pin<Box<dyn AsyncRead + Send + '_>>) -> io::Result<Vec<u8>> {
    block_on(async move {
        let mut out = Vec::new();
        (&mut r).take(OUT_CAP).read_to_end(&mut out).await?;
        Ok(out)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let codec = Compression::ALL[usize::from(sel & 0x7f) % Compression::ALL.len()];
    if sel & 0x80 == 0 {
        let (first, heap) = peak_heap(|| drain(codec.decoder_within(BufReader::new(rest), WINDOW)));
        assert!(
            heap <= WINDOW as usize + CODEC_STATE + 2 * OUT_CAP as usize,
            "{codec} decoder held {heap} bytes of heap for {} bytes of input",
            rest.len()
        );
        let second = drain(codec.decoder_within(BufReader::new(rest), WINDOW));
        match (&first, &second) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{codec}: two decodings differ"),
            (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind(), "{codec}: errors differ"),
            _ => panic!("{codec}: one decoding failed, the other did not: {first:?} {second:?}"),
        }
        if let Ok(plain) = first {
            let _ = nar::read_at_most(&plain[..], &mut (), plain.len() as u64);
        }
    } else {
        // Round trips need no big inputs, and bzip2's block sort costs most of a run on them.
        let rest = &rest[..rest.len().min(ROUND_TRIP_MAX)];
        let chunks: Vec<bytes::Bytes> = block_on(
            codec
                .compress_stream(
                    futures::stream::iter([Ok(bytes::Bytes::copy_from_slice(rest))]),
                    Some(1),
                )
                .try_collect(),
        )
        .unwrap_or_else(|e| panic!("{codec} encoder failed: {e}"));
        let packed = chunks.concat();
        let back = drain(codec.decoder_within(BufReader::new(&packed[..]), WINDOW))
            .unwrap_or_else(|e| panic!("{codec} cannot decode its own output: {e}"));
        assert!(back == rest, "{codec}: decode(encode(x)) != x");
    }
});
