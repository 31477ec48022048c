//! Nix's formats, owned by this project: store paths, nixbase32, hashes, narinfo,
//! nix-cache-info, NAR (reader, writer, listing), signatures and compression names. Each is
//! proven against the real Nix in the workspace's `tests/`.
//!
//! This crate is pure: no actor system, HTTP, bucket, database or async runtime, so a parser
//! user (the fuzz targets, other tools) compiles only what parsing needs. The feature `tokio`
//! adds streaming adapters over tokio's async I/O: the compression codecs ([`codec`]) and
//! [`nar::dump_stream`].
#![warn(missing_docs)]

pub mod cache_info;
#[cfg(feature = "tokio")]
pub mod codec;
pub mod compression;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signing;
pub mod store_path;

pub use cache_info::CacheInfo;
pub use compression::Compression;
pub use hash::{Algo, Hash};
pub use narinfo::NarInfo;
pub use signing::{PublicKey, SecretKey, Signature};
pub use store_path::{Digest, StoreDir, StorePath};
