//! The PXE server's one error type.

use std::path::PathBuf;

/// Everything tether-pxe can fail at, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A DHCP packet that does not decode (truncated, bad option lengths, no magic cookie).
    #[error("malformed DHCP packet: {0}")]
    DhcpDecode(String),
    /// A DHCP reply we built could not be encoded (a bug, reported rather than panicking).
    #[error("cannot encode DHCP reply: {0}")]
    DhcpEncode(String),
    /// A TFTP packet that does not parse.
    #[error("malformed TFTP packet: {0}")]
    TftpPacket(String),
    /// A value of the node contract (MAC, token, CA pin, URL, command line) that does not
    /// parse or is unsafe to render.
    #[error(transparent)]
    Contract(#[from] tether_boot::Error),
    /// A value that would be interpolated into an iPXE script or kernel command line is unsafe.
    #[error("refusing unsafe {what} {value:?}: {why}")]
    Unsafe {
        /// Which value (URL, token, command-line argument, …).
        what: &'static str,
        /// The offending value.
        value: String,
        /// What rule it breaks.
        why: &'static str,
    },
    /// A configuration file or flag that is wrong.
    #[error("configuration {path}: {detail}")]
    Config {
        /// The file (or `flags`).
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A boot binary (undionly.kpxe, ipxe.efi) that is missing at start-up.
    #[error(
        "boot file {name} not found (looked in {searched}); install Debian's `ipxe` package or pass --ipxe-dir"
    )]
    MissingBootFile {
        /// The file name.
        name: &'static str,
        /// Directories searched.
        searched: String,
    },
    /// The machine's boot plan refers to something that does not exist.
    #[error("no boot plan for {mac}: {detail}")]
    NoPlan {
        /// The machine.
        mac: String,
        /// Why.
        detail: String,
    },
    /// A MAC we do not know asked for a script without having DHCP'd on our segment
    /// recently: nothing is created for it.
    #[error("MAC {mac} is unknown and has not DHCP'd on this segment recently")]
    NotSeen {
        /// The machine.
        mac: String,
    },
    /// The machine API is not published (no ConfigMap, or an unusable one), so no boot
    /// token is minted and no script served.
    #[error("machine API not published: {0}")]
    Unpublished(String),
    /// A serving task ended while the server was meant to be running.
    #[error("{task} task {how}; stopping so that a supervisor restarts the whole server")]
    TaskDied {
        /// Which task (`dhcp`, `proxy-dhcp`, `tftp`, `http`, `token-gc`).
        task: &'static str,
        /// What happened (`panicked: …`, `failed: …`, `ended`).
        how: String,
    },
    /// The lease database could not be read or written.
    #[error("lease file {path}: {detail}")]
    Leases {
        /// The lease file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The address pool has no free address.
    #[error("address pool exhausted")]
    PoolExhausted,
    /// An I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On what (file, socket address, interface).
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes {op}: {source}")]
    Kube {
        /// What we were doing.
        op: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A closure for `map_err` that wraps an I/O error with what and where.
    pub fn io(
        op: &'static str,
        path: impl std::fmt::Display,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_string();
        move |source| Error::Io { op, path, source }
    }

    /// A closure for `map_err` that wraps a kube error with what we were doing.
    pub fn kube(op: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let op = op.into();
        move |source| Error::Kube { op, source }
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
