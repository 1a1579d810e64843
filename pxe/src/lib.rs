//! tether-pxe: one program that boots a fleet over the network — proxyDHCP (or full DHCP),
//! TFTP for the firmware-stage iPXE binaries, and HTTP for per-machine iPXE scripts and
//! content-addressed artifacts. It asks a [`source::BootSource`] (a TOML file, or the
//! management cluster's `Machine`/`BootImage` objects) what each MAC should boot.
//!
//! Protocol handling ([`dhcp`], [`tftp`], [`script`], [`http::range`]) is pure and
//! table-tested; sockets are at the edges ([`dhcp::server`], [`tftp::server`], [`http`]).

pub mod artifacts;
pub mod dhcp;
pub mod error;
pub mod http;
pub mod metrics;
pub mod recent;
pub mod script;
pub mod serve;
pub mod source;
pub mod tftp;

pub use error::{Error, Result};
