//! The image builder's one error type: every variant names what was being done and to what,
//! so a failed build says why without a backtrace.

use std::path::{Path, PathBuf};

/// Everything tether-image can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec file is not valid TOML of the expected shape.
    #[error("spec {path}: {detail}")]
    SpecParse {
        /// The spec file.
        path: PathBuf,
        /// What the TOML parser said.
        detail: String,
    },
    /// The spec parsed but a value is not acceptable.
    #[error("spec: {field}: {reason}")]
    SpecInvalid {
        /// The offending field.
        field: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An external tool failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line (program and the arguments that matter).
        command: String,
        /// Its exit status and the tail of its stderr.
        detail: String,
    },
    /// A tool the build needs is not installed.
    #[error("{tool} not found on PATH: {hint}")]
    MissingTool {
        /// The program.
        tool: String,
        /// How to get it.
        hint: String,
    },
    /// A Debian package the spec asks for does not exist in the configured sources.
    #[error("Debian package {package:?} is not available from the host's apt sources ({detail})")]
    MissingPackage {
        /// The package.
        package: String,
        /// What apt said.
        detail: String,
    },
    /// The output file system has too little free space for the build.
    #[error("not enough space in {path}: {available} MiB free, the build needs about {needed} MiB")]
    NoSpace {
        /// The directory checked.
        path: PathBuf,
        /// MiB available.
        available: u64,
        /// MiB needed.
        needed: u64,
    },
    /// A key file is malformed.
    #[error("key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A signature did not verify, or an artifact does not match its manifest.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The kernel image holds no payload we can decompress to an ELF `vmlinux`.
    #[error("no vmlinux found in {path}: {reason}")]
    Kernel {
        /// The kernel image.
        path: PathBuf,
        /// What was tried.
        reason: String,
    },
    /// The host cannot be used (release, apt sources).
    #[error(transparent)]
    Upstream(#[from] tether_upstream::Error),
}

impl Error {
    /// A closure for `map_err` that records `action` on `path`.
    pub fn io(
        action: &'static str,
        path: impl AsRef<Path>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
