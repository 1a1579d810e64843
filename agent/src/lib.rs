//! `tether-agent`: the program every worker node runs under systemd.
//!
//! Today it holds the systemd D-Bus client the agent uses to start what it installs; the
//! enrollment, join, tunnel and upgrade logic arrive with their issues.

pub mod error;
pub mod systemd;

pub use error::Error;
