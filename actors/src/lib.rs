//! The engine of nixcached: Nix formats, store backends, and (in later modules) the actors that
//! serve and upload them.
//!
//! The binary crate `nixcached` is only command-line parsing and wiring on top of this crate,
//! so everything here can be used programmatically (see `examples/`).
#![warn(missing_docs)]

pub mod catalog;
pub mod fetcher;
pub mod formats;
pub mod http;
pub mod lookup;
pub mod metrics;
pub mod nar_files;
pub mod publish;
pub mod send;
pub mod serve;
pub mod store;
pub mod upload;
