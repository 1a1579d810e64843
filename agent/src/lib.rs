//! `tether-agent`: the program every worker node runs under systemd.
//!
//! Pure parts with table tests: [`inputs`] (where the first-contact inputs come from),
//! [`facts`], [`identity`] (state directory, renewal point), [`clock`], [`enroll::Phase`].
//! Edges, kept thin: [`api`] (the machine API over HTTPS), [`tls`] (pinned first contact,
//! mTLS after), [`systemd`] (D-Bus), [`notify`] (sd_notify), [`service`] (the loop).
//! [`tunnel`]: the konnectivity agent (the tenant kube-apiserver's way to this node), with its
//! packet rules and allow-list pure and its gRPC streams at the edge.

pub mod api;
pub mod clock;
pub mod enroll;
pub mod error;
pub mod facts;
pub mod fs;
pub mod identity;
pub mod inputs;
pub mod node;
pub mod notify;
pub mod service;
pub mod systemd;
pub mod tls;
pub mod tunnel;

pub use error::Error;
