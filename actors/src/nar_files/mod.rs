//! Single files out of NARs, for the explorer's NAR browser.
//!
//! Two ways in, chosen per object:
//! - **ranged**: the narinfo says `Compression: none` and the store has a listing with
//!   `narOffset`s (the local store computes one; binary caches keep `.ls` files), so a file is
//!   one ranged read of the NAR, however large the NAR is;
//! - **streamed**: otherwise the NAR is read from the start through its decompressor and the
//!   streaming NAR reader, up to the wanted file; its bytes are then decoded as the client
//!   pulls them ([`pulled`]).
//!
//! Either way memory stays bounded by a few chunks whatever the size of the NAR or of the
//! file, and a client that stops reading holds no thread and, once its decoder slot is taken
//! ([`slots`]), no decoder.

mod pulled;
mod slots;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use moka::future::Cache;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::budget::{self, BudgetRef};
use crate::fetcher::{FetchListing, Fetcher, OpenNar};
use crate::formats::codec::WindowTooLarge;
use crate::formats::nar::{self, Listing, NarError, Node};
use crate::formats::{Compression, Digest, NarInfo};
use crate::store::{ByteRange, ByteStream, StoreError};

/// Bytes between the store's stream and the decoder of a listing pass.
const CHUNK: usize = 64 * 1024;

/// Largest decoder window the explorer spends on one NAR.
///
/// Nix writes zstd with a 2 MiB window (level 3; 8 MiB at level 19) and xz with an 8 MiB
/// dictionary (its default, -6); such NARs decode. A stream that asks for more (zstd --long
/// or --ultra, xz -7 to -9: up to 64 MiB, and a hostile header may claim 2 GiB) is refused
/// with an error page rather than costing that much per view.
pub const MAX_DECODER_WINDOW: u64 = 8 << 20;

/// Decoders alive at once for file views, however many clients read or stall: with
/// [`MAX_DECODER_WINDOW`] they take at most some 150 MiB, with Nix's zstd some 40 MiB.
pub const DECODER_SLOTS: usize = 16;

/// How long a file view's decoder may go unused before another view may take it. A client
/// reading steadily polls far more often; one that stalls loses its decoder, keeps its
/// position and reopens the NAR there once it reads again.
pub const DECODER_IDLE: Duration = Duration::from_millis(100);

/// An object's file tree, and whether its offsets may be used for ranged reads.
#[derive(Debug)]
pub struct ObjectTree {
    /// The tree, with sizes, executable bits, symlink targets and NAR offsets.
    pub listing: Listing,
    /// True when a file can be fetched with one ranged read of the stored NAR.
    pub ranged: bool,
}

/// A file's bytes (or a window of them) on their way out.
pub struct FileBytes {
    /// The bytes of the window.
    pub stream: ByteStream,
    /// Where the window lies in the file.
    pub span: (u64, u64),
    /// The whole file's size.
    pub size: u64,
}

/// Finds files inside the NARs of one store; keeps recently used trees in memory.
pub struct NarFiles {
    fetcher: Addr<Fetcher>,
    /// Whole-NAR passes at once (trees of NARs without a usable listing): each holds a
    /// decoder and a blocking thread, and different NARs do not share one.
    passes: BudgetRef,
    trees: Cache<Digest, Arc<ObjectTree>>,
    decoders: Arc<pulled::Pool>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// A NAR that could not be read: refused for its decoder window, or corrupt.
fn nar_failure(what: &str, e: NarError) -> StoreError {
    if let NarError::Io(io) = &e {
        if let Some(w) = io
            .get_ref()
            .and_then(|e| e.downcast_ref::<WindowTooLarge>())
        {
            return StoreError::Unsupported(format!("{what}: {w}"));
        }
    }
    corrupt(what, e)
}

fn mailbox(e: actix::MailboxError) -> StoreError {
    StoreError::backend("store actor", e.to_string())
}

/// Rough memory a tree takes, for the cache's bound. Walks with its own stack, like every
/// walk over a tree that came from a cache.
fn weight(root: &Node) -> u64 {
    let mut total = 0u64;
    let mut todo = vec![root];
    while let Some(node) = todo.pop() {
        total = total.saturating_add(match node {
            Node::Regular { .. } => 48,
            Node::Symlink { target } => 48 + target.len() as u64,
            Node::Directory { entries } => {
                todo.extend(entries.values());
                entries.keys().map(|k| 48 + k.len() as u64).sum()
            }
        });
    }
    total
}

impl NarFiles {
    /// A finder over the store behind `fetcher`, keeping up to `max_bytes` of trees; whole
    /// NAR passes spend slots of `passes`.
    pub fn new(fetcher: Addr<Fetcher>, max_bytes: u64, passes: BudgetRef) -> NarFiles {
        let trees = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Digest, t: &Arc<ObjectTree>| {
                weight(&t.listing.root).try_into().unwrap_or(u32::MAX)
            })
            .build();
        NarFiles {
            fetcher,
            passes,
            trees,
            decoders: pulled::Pool::new(DECODER_SLOTS, DECODER_IDLE),
        }
    }

    /// The file tree of the object `info` describes: the store's listing when it has one,
    /// else one streamed pass over the NAR.
    pub async fn tree(&self, info: &NarInfo) -> Result<Arc<ObjectTree>, StoreError> {
        let digest = *info.store_path.digest();
        let fetcher = self.fetcher.clone();
        let passes = self.passes.clone();
        let info = info.clone();
        self.trees
            .try_get_with(digest, async move {
                let listing = match fetcher.send(FetchListing(digest)).await.map_err(mailbox)? {
                    Ok(json) => Listing::from_json(&json).map_err(|e| {
                        // The NAR is the truth; a broken or hostile listing only costs the
                        // ranged reads.
                        tracing::warn!("{digest}.ls: {e}; reading the NAR instead");
                    }),
                    Err(StoreError::NotFound(_)) => Err(()),
                    Err(StoreError::Corrupt(e)) => {
                        tracing::warn!("{digest}.ls: {e}; reading the NAR instead");
                        Err(())
                    }
                    Err(e) => return Err(e),
                };
                match listing {
                    Ok(listing) => {
                        // Offsets of 0 mean the listing lacks them (older writers); offsets
                        // past the NAR's end mean it does not describe this NAR.
                        let ranged = info.compression == Compression::None
                            && offsets_fit(&listing.root, info.nar_size);
                        Ok(Arc::new(ObjectTree { listing, ranged }))
                    }
                    Err(()) => {
                        let _slot = budget::acquire(&passes).await?;
                        let listing = stream_listing(&fetcher, &info).await?;
                        Ok(Arc::new(ObjectTree {
                            listing,
                            ranged: false,
                        }))
                    }
                }
            })
            .await
            // Every waiter gets the same error, kind and all: a corrupt NAR stays Corrupt.
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }

    /// The bytes of the regular file at `path` (bytes, `/`-separated), or of `window` of it.
    pub async fn open(
        &self,
        info: &NarInfo,
        tree: &ObjectTree,
        path: &[u8],
        window: Option<ByteRange>,
    ) -> Result<FileBytes, StoreError> {
        let node = lookup(&tree.listing.root, path)
            .ok_or_else(|| StoreError::NotFound("no such file in the NAR".into()))?;
        let Node::Regular {
            size, nar_offset, ..
        } = *node
        else {
            return Err(StoreError::Invalid("not a regular file".into()));
        };
        let span = ByteRange::resolve_or_err(window, size)?;
        if size == 0 {
            return Ok(FileBytes {
                stream: Box::pin(futures::stream::empty()),
                span: (0, 0),
                size,
            });
        }
        if tree.ranged {
            // `offsets_fit` checked the file lies inside the NAR, so these cannot overflow.
            let blob = self
                .fetcher
                .send(OpenNar {
                    url: info.url.clone(),
                    range: Some(ByteRange::span(
                        nar_offset.saturating_add(span.0),
                        Some(nar_offset.saturating_add(span.1)),
                    )),
                })
                .await
                .map_err(mailbox)??;
            return Ok(FileBytes {
                stream: blob.stream,
                span,
                size,
            });
        }
        let stream = pulled::open(
            &self.decoders,
            &self.fetcher,
            info,
            path.to_vec(),
            span,
            MAX_DECODER_WINDOW,
        )
        .await?;
        Ok(FileBytes {
            stream: Box::pin(stream),
            span,
            size,
        })
    }
}

/// Follows a byte path (no symlinks) from `root`.
pub fn lookup<'a>(root: &'a Node, path: &[u8]) -> Option<&'a Node> {
    let mut node = root;
    for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        match node {
            Node::Directory { entries } => node = entries.get(part)?,
            _ => return None,
        }
    }
    Some(node)
}

/// Whether every file of the tree has an offset and lies inside a NAR of `nar_size` bytes,
/// so that ranged reads by the listing cannot run past the NAR or overflow.
fn offsets_fit(root: &Node, nar_size: u64) -> bool {
    let mut todo = vec![root];
    while let Some(node) = todo.pop() {
        match node {
            Node::Regular {
                nar_offset, size, ..
            } => {
                let inside = nar_offset
                    .checked_add(*size)
                    .is_some_and(|end| end <= nar_size);
                if *nar_offset == 0 || !inside {
                    return false;
                }
            }
            Node::Symlink { .. } => {}
            Node::Directory { entries } => todo.extend(entries.values()),
        }
    }
    true
}

/// The uncompressed NAR of `info` as a blocking reader, for the NAR reader on a blocking
/// thread; must be called inside the runtime the stream belongs to.
type BlockingNar = io::BufReader<SyncIoBridge<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>>>;

async fn nar_reader(fetcher: &Addr<Fetcher>, info: &NarInfo) -> Result<BlockingNar, StoreError> {
    let blob = fetcher
        .send(OpenNar {
            url: info.url.clone(),
            range: None,
        })
        .await
        .map_err(mailbox)??;
    let raw = tokio::io::BufReader::with_capacity(CHUNK, StreamReader::new(blob.stream));
    // The reader skips unwanted files in small reads; a buffer turns them into few
    // round trips to the runtime.
    Ok(io::BufReader::with_capacity(
        4 * CHUNK,
        SyncIoBridge::new(info.compression.decoder_within(raw, MAX_DECODER_WINDOW)),
    ))
}

async fn stream_listing(fetcher: &Addr<Fetcher>, info: &NarInfo) -> Result<Listing, StoreError> {
    let reader = nar_reader(fetcher, info).await?;
    let what = info.store_path.to_string();
    let nar_size = info.nar_size;
    tokio::task::spawn_blocking(move || nar::read_at_most(reader, &mut (), nar_size))
        .await
        .map_err(|e| StoreError::backend("NAR reader thread", e.to_string()))?
        .map_err(|e| nar_failure(&what, e))
}

/// Reads at most `limit` bytes of a stream (for inline views of small text files).
pub async fn read_prefix(mut stream: ByteStream, limit: usize) -> io::Result<Vec<u8>> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while out.len() < limit {
        match stream.next().await {
            Some(chunk) => {
                let chunk = chunk?;
                let take = chunk.len().min(limit - out.len());
                out.extend_from_slice(&chunk[..take]);
            }
            None => break,
        }
    }
    Ok(out)
}
