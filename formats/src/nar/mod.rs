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
pub use reader::{read, read_at_most, NarError, NarVisitor};
#[cfg(feature = "tokio")]
pub use stream::{dump_stream, NarStream};
pub use writer::{dump, listing};

/// The magic string at the start of every NAR.
pub const MAGIC: &str = "nix-archive-1";

/// Deepest nesting of directories accepted in a NAR or a listing (the root directory counts
/// as one).
///
/// Nix archives real file trees, and a path inside one must fit in `PATH_MAX` (4096 bytes)
/// with the store prefix: at two bytes a level (`a/`) that bounds any tree Nix could have
/// dumped at about 2,025 levels, and real store paths stay below a hundred (the deepest are
/// nested `node_modules`). 256 is well above anything real, and it bounds the recursive walks
/// over a [`Listing`] and over a parsed `.ls` (serde_json's value parser takes about 1 KiB of
/// stack a level, two levels a directory): at this bound parsing needs about 512 KiB, a
/// quarter of a thread's 2 MiB stack. An archive nested deeper is refused as hostile instead
/// of overflowing a stack.
pub const MAX_DEPTH: usize = 256;

/// Longest name of a directory entry: `NAME_MAX` on Linux, which Nix's own NAR parser enforces.
pub const MAX_NAME: usize = 255;

/// Longest symlink target: `PATH_MAX` less its terminating NUL; the kernel stores no longer
/// target, so a longer one cannot come from a real tree.
pub const MAX_TARGET: usize = 4095;

/// Most nodes (files, directories and symlinks together) in one NAR or listing.
///
/// The largest store paths (a full TeX Live, an unpacked kernel or browser source tree) hold
/// a few hundred thousand entries; a million leaves room and bounds the memory a listing
/// takes (some 100 bytes a node) at about 100 MiB, where a few MiB of compressed empty files
/// could otherwise ask for gigabytes.
pub const MAX_NODES: u64 = 1_000_000;

/// Longest `.ls` listing accepted, in bytes.
///
/// A listing takes some 60 to 100 bytes a node, so the largest real store paths (a few
/// hundred thousand entries) give listings of a few tens of MiB; 64 MiB is generous for
/// them and bounds what one hostile listing can make the daemon hold (the parsed JSON takes
/// a few times its text). A larger one is treated as absent and the NAR is read instead.
pub const MAX_LISTING_BYTES: usize = 64 << 20;

/// Why `name` cannot be a directory entry, as Nix rules it: not empty, `.` or `..`, no `/`
/// or NUL, at most [`MAX_NAME`] bytes. A name that passes cannot leave its directory.
pub(crate) fn bad_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() || name == b"." || name == b".." {
        Some("reserved name")
    } else if name.contains(&b'/') || name.contains(&0) {
        Some("contains '/' or NUL")
    } else if name.len() > MAX_NAME {
        Some("longer than 255 bytes")
    } else {
        None
    }
}

/// Bytes needed to pad `n` to a multiple of 8.
pub(crate) const fn padding(n: u64) -> u64 {
    (8 - n % 8) % 8
}
