//! NAR, the Nix ARchive: a canonical serialisation of a file-system tree.
//!
//! Every token is a length-prefixed string (`u64` little endian, bytes, zero padding to 8);
//! file contents are one such string. Directory entries are sorted by name, so the same
//! tree always gives the same bytes, and that is what `NarHash` is taken over.

mod dumper;
mod listing;
mod reader;
#[cfg(feature = "tokio")]
mod stream;
mod writer;

pub use dumper::Dumper;
pub use listing::{Listing, Node};
pub use reader::{read, NarError, NarVisitor};
#[cfg(feature = "tokio")]
pub use stream::{dump_stream, NarStream};
pub use writer::{dump, listing};

/// The magic string at the start of every NAR.
pub const MAGIC: &str = "nix-archive-1";

/// Bytes needed to pad `n` to a multiple of 8.
pub(crate) const fn padding(n: u64) -> u64 {
    (8 - n % 8) % 8
}
