//! Pinned upstream binaries: which versions Tether runs, how they are built from their Go
//! modules with the machine's Go toolchain, and the cache they are kept in.
//!
//! `cargo xtask deps` uses this crate to fill the cache; the test harness uses it to find
//! binaries (and to build a non-default version lazily, e.g. the previous Kubernetes minor
//! for upgrade tests). Nothing here is committed to the repository: binaries live in
//! [`Cache`], outside the work tree, keyed by component and version.

mod build;
mod cache;
pub mod debian;
mod error;
mod gomod;
mod pins;

pub use build::{BuildReport, Builder};
pub use cache::Cache;
pub use error::Error;
pub use gomod::rewrite_go_mod;
pub use pins::{Component, Module, NODE_COMPONENTS, Pins, minor_of};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
