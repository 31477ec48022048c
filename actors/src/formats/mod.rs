//! Nix's formats, owned by this project: store paths, hashes, narinfo, cache info, NAR,
//! signatures and compressions. Each is proven against the real Nix in `tests/`.

pub mod cache_info;
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
pub use store_path::{StoreDir, StorePath};
