//! The engine of nixcached: store backends, and the actors that serve and upload them. The Nix
//! formats live in the crate `nixcached-formats` (re-exported as [`formats`]).
//!
//! The binary crate `nixcached` is only command-line parsing and wiring on top of this crate,
//! so everything here can be used programmatically (see `examples/`).
#![warn(missing_docs)]

/// The Nix formats, from the pure crate `nixcached-formats`, re-exported because the public
/// API of this crate (messages, stores) speaks in its types.
pub use nixcached_formats as formats;

pub mod access;
pub mod budget;
pub mod catalog;
pub mod fetcher;
pub mod fsck;
pub mod gc;
pub mod http;
pub mod lookup;
pub mod metrics;
pub mod nar_files;
pub mod progress;
pub mod publish;
pub mod send;
pub mod serve;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod upload;
