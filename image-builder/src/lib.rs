//! `tether-image`: builds the immutable node image — Debian's kernel, our small initramfs,
//! a dm-verity protected read-only rootfs with the agent baked in, and a signed manifest.
//! Pure parts (spec, manifest, signing, rendering, cpio, layouts) are separate modules with
//! table tests; [`build`] is the I/O pipeline that drives mmdebstrap and friends.

pub mod boot;
pub mod boot_artifacts;
pub mod build;
pub mod containers;
pub mod cpio;
pub mod disk;
pub mod error;
pub mod gpt;
pub mod kernel;
pub mod keys;
pub mod node_artifacts;
pub mod oci;
pub mod spec;

pub use error::{Error, Result};
