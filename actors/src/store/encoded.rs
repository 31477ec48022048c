//! Objects stored with a `Content-Encoding`: reading them back as the text they are.
//!
//! Nix's S3 store writes narinfos, `.ls` listings and build logs compressed when told to
//! (`narinfo-compression`, `ls-compression`, `log-compression`), and the object's
//! `Content-Encoding` says how; cache.nixos.org keeps its listings and logs as brotli. Nix's
//! client undoes the encoding, so a cache that did not would answer nonsense where Nix reads
//! text. Backends report the encoding where they can (S3 metadata, HTTP headers,
//! [`Blob::encoding`]); where they cannot (a folder copied out of a bucket), the compressions
//! with a magic number are recognised by it, which is safe because a narinfo, a listing and
//! a log all begin with text.

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{Blob, ByteStream, Result, StoreError};
use crate::formats::Compression;
// Nix's own compressors need no more (xz's default preset takes 8 MiB), and a hostile header
// asking for more must not make a decoder allocate it.
use crate::nar_files::MAX_DECODER_WINDOW;

/// The compression a `Content-Encoding` value names; `None` for identity, an empty value,
/// or an encoding that is not a compression Nix writes (the bytes are then taken as they
/// are, and a parser says what is wrong with them).
pub fn from_header(value: &str) -> Option<Compression> {
    match value.trim().to_ascii_lowercase().as_str() {
        "xz" | "x-xz" => Some(Compression::Xz),
        "zstd" | "zst" => Some(Compression::Zstd),
        "br" => Some(Compression::Br),
        "gzip" | "x-gzip" => Some(Compression::Gzip),
        "bzip2" | "x-bzip2" | "bz2" => Some(Compression::Bzip2),
        _ => None,
    }
}

/// The compression whose magic number `head` starts with (brotli has none).
pub fn sniff(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Compression::Xz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
        Some(Compression::Bzip2)
    } else {
        None
    }
}

/// How a stored object is encoded: as its backend said, else as its first bytes show.
fn encoding_of(declared: Option<Compression>, head: &[u8]) -> Option<Compression> {
    declared
        .filter(|c| *c != Compression::None)
        .or_else(|| sniff(head))
}

/// Decodes a small object read whole (narinfo, listing, `nix-cache-info`) that was stored
/// with `declared` encoding (or that starts with a compression's magic number), refusing one
/// that decodes to more than `max` bytes.
pub async fn decode_small(
    bytes: Vec<u8>,
    declared: Option<Compression>,
    max: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let Some(c) = encoding_of(declared, &bytes) else {
        return Ok(bytes);
    };
    let mut out = Vec::new();
    c.decoder_within(&bytes[..], MAX_DECODER_WINDOW)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .await
        .map_err(|e| {
            StoreError::Corrupt(format!(
                "{what} is stored {}-compressed but does not decode ({e}); write it again",
                c.name()
            ))
        })?;
    if out.len() > max {
        return Err(StoreError::Corrupt(format!(
            "{what} decompresses to more than the {max} bytes a real one ever takes; the store holds a corrupt or hostile object, remove or replace it"
        )));
    }
    Ok(out)
}

/// A whole object (a build log) as its decoded bytes, at most `max` of them.
///
/// An unencoded one passes through. An encoded one is decoded into an anonymous temporary
/// file (gone when closed), because a response needs its length first and a log can be
/// gigabytes that compress to kilobytes: disk, not memory, holds it.
pub async fn decode_whole(blob: Blob, max: u64, what: &str) -> Result<Blob> {
    let (head, stream) = peek(blob.stream, 8).await?;
    let Some(c) = encoding_of(blob.encoding, &head) else {
        return Ok(Blob {
            stream,
            encoding: None,
            ..blob
        });
    };
    spool_decoded(stream, c, max, what).await
}

/// Decodes `c`-compressed `stream` into an anonymous temporary file, at most `max` bytes,
/// and hands the file back as a blob.
pub async fn spool_decoded(
    stream: ByteStream,
    c: Compression,
    max: u64,
    what: &str,
) -> Result<Blob> {
    let spool = tokio::task::spawn_blocking(tempfile::tempfile)
        .await
        .map_err(|e| StoreError::backend("spool task", e))?
        .map_err(|e| StoreError::backend(format!("spooling {what}"), e))?;
    let mut spool = tokio::fs::File::from_std(spool);
    let reader = tokio::io::BufReader::new(tokio_util::io::StreamReader::new(stream));
    let mut decoder = c.decoder_within(reader, MAX_DECODER_WINDOW).take(max + 1);
    let total = tokio::io::copy(&mut decoder, &mut spool)
        .await
        .map_err(|e| {
            StoreError::Corrupt(format!(
                "{what} is stored {}-compressed but does not decode: {e}",
                c.name()
            ))
        })?;
    if total > max {
        return Err(StoreError::Corrupt(format!(
            "{what} decompresses to more than {max} bytes; it is not served"
        )));
    }
    spool
        .flush()
        .await
        .and(spool.rewind().await)
        .map_err(|e| StoreError::backend(format!("spooling {what}"), e))?;
    Ok(Blob {
        stream: Box::pin(tokio_util::io::ReaderStream::new(spool)),
        span: (0, total),
        encoding: None,
        total,
    })
}

/// The first `n` bytes of a stream (fewer if it is shorter), and the whole stream again.
async fn peek(mut stream: ByteStream, n: usize) -> Result<(Vec<u8>, ByteStream)> {
    let mut taken: Vec<Bytes> = Vec::new();
    let mut len = 0;
    while len < n {
        match stream.next().await {
            Some(Ok(chunk)) => {
                len += chunk.len();
                taken.push(chunk);
            }
            Some(Err(e)) => return Err(StoreError::backend("reading", e)),
            None => break,
        }
    }
    let head: Vec<u8> = taken
        .iter()
        .flat_map(|c| c.iter().copied())
        .take(n)
        .collect();
    let again = futures::stream::iter(taken.into_iter().map(Ok)).chain(stream);
    Ok((head, Box::pin(again)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Compression;

    async fn compress(c: Compression, text: &[u8]) -> Vec<u8> {
        let input: ByteStream = Box::pin(futures::stream::once({
            let b = Bytes::copy_from_slice(text);
            async move { Ok(b) }
        }));
        let mut out = Vec::new();
        let mut s = c.compress_stream(input, None);
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[test]
    fn header_values_name_the_compressions_nix_writes() {
        assert_eq!(from_header("br"), Some(Compression::Br));
        assert_eq!(from_header(" XZ "), Some(Compression::Xz));
        assert_eq!(from_header("zstd"), Some(Compression::Zstd));
        assert_eq!(from_header("gzip"), Some(Compression::Gzip));
        assert_eq!(from_header("bzip2"), Some(Compression::Bzip2));
        assert_eq!(from_header("identity"), None);
        assert_eq!(from_header("aws-chunked"), None);
    }

    #[tokio::test]
    async fn every_compression_decodes_by_header_and_all_but_brotli_by_magic() {
        let text = b"StorePath: /nix/store/00000000000000000000000000000000-x\n".repeat(20);
        for c in Compression::ALL {
            let stored = compress(c, &text).await;
            let by_header = decode_small(stored.clone(), Some(c), 4096, "x")
                .await
                .unwrap();
            assert_eq!(by_header, text, "{c}");
            if c != Compression::Br {
                let by_magic = decode_small(stored, None, 4096, "x").await.unwrap();
                assert_eq!(by_magic, text, "{c}");
            }
        }
        // Plain text is left alone.
        let plain = decode_small(text.clone(), None, 4096, "x").await.unwrap();
        assert_eq!(plain, text);
    }

    #[tokio::test]
    async fn a_small_object_that_decodes_past_its_cap_is_refused() {
        // A bomb: a few hundred bytes of xz that decode to 1 MiB.
        let bomb = compress(Compression::Xz, &vec![b'a'; 1 << 20]).await;
        assert!(bomb.len() < 4096);
        let err = decode_small(bomb, None, 64 * 1024, "x.narinfo")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("decompresses to more than"),
            "{err}"
        );
        let junk = decode_small(vec![0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2], None, 100, "x")
            .await
            .unwrap_err();
        assert!(junk.to_string().contains("does not decode"), "{junk}");
    }

    #[tokio::test]
    async fn a_log_is_spooled_decoded_with_its_length() {
        let text = b"building...\n".repeat(1000);
        for c in [Compression::Br, Compression::Bzip2, Compression::None] {
            let stored = compress(c, &text).await;
            let declared = (c == Compression::Br).then_some(c);
            let blob = Blob {
                total: stored.len() as u64,
                span: (0, stored.len() as u64),
                stream: Box::pin(futures::stream::iter(
                    stored
                        .chunks(3)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect::<Vec<_>>(),
                )),
                encoding: declared,
            };
            let out = decode_whole(blob, 1 << 20, "log/x.drv").await.unwrap();
            assert_eq!(out.total, text.len() as u64, "{c}");
            assert_eq!(out.into_bytes().await.unwrap(), text, "{c}");
        }
        let bomb = compress(Compression::Bzip2, &vec![b'a'; 1 << 20]).await;
        let blob = Blob {
            total: bomb.len() as u64,
            span: (0, bomb.len() as u64),
            stream: Box::pin(futures::stream::once(async move { Ok(Bytes::from(bomb)) })),
            encoding: None,
        };
        let err = decode_whole(blob, 1000, "log/x.drv").await.unwrap_err();
        assert!(err.to_string().contains("more than 1000 bytes"), "{err}");
    }
}
