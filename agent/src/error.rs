//! The agent's one error type: every variant says what was being done and to what, so a log
//! line (or `tether-agent enroll`'s exit message) is enough to act on.

use std::path::{Path, PathBuf};

use tether_api::machine_api::ApiError;

/// Everything the agent can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A D-Bus call to systemd failed.
    #[error("systemd: {action}: {source}")]
    Systemd {
        /// What was being done.
        action: String,
        /// zbus's error (boxed: it is large, and every other error would pay for it).
        #[source]
        source: Box<zbus::Error>,
    },
    /// A systemd job finished with a result other than `done`.
    #[error("systemd job for {unit} finished with result {result:?}")]
    JobFailed {
        /// The unit.
        unit: String,
        /// systemd's job result.
        result: String,
    },
    /// Waiting took longer than allowed.
    #[error("timed out after {seconds}s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        seconds: u64,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// To what.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// No enrollment inputs were found anywhere.
    #[error("no enrollment inputs: {0}")]
    NoInputs(String),
    /// An input (command line, seed, state file) is malformed.
    #[error("{source_name}: {detail}")]
    BadInput {
        /// Where it came from (`/proc/cmdline`, `NoCloud seed /dev/sr0`, …).
        source_name: String,
        /// What is wrong.
        detail: String,
    },
    /// The machine API presented no certificate matching the pin: nothing was sent.
    #[error("machine API at {url} is not trusted: {detail}")]
    Untrusted {
        /// The API URL.
        url: String,
        /// Which pins were presented and which was expected.
        detail: String,
    },
    /// The machine API could not be reached (connect, TLS, timeout).
    #[error("machine API {url}: {detail}")]
    Unreachable {
        /// The URL requested.
        url: String,
        /// reqwest's account of it.
        detail: String,
    },
    /// The machine API refused the request.
    #[error("machine API refused {what}: {error}")]
    Refused {
        /// The request.
        what: String,
        /// The API's reason and message.
        error: ApiError,
    },
    /// A download from the artifact store failed (network, HTTP status, size); a partial
    /// file is kept for the next attempt to resume unless it cannot be right.
    #[error("download {url}: {detail}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// A downloaded artifact is not what the desired config names: it was removed and
    /// nothing was installed.
    #[error("download {url}: sha256 {actual}, expected {expected}; removed, nothing installed")]
    DigestMismatch {
        /// The URL.
        url: String,
        /// The digest asked for.
        expected: String,
        /// The digest received.
        actual: String,
    },
    /// Not enough room for a download.
    #[error("{path}: {free} bytes free, {need} needed")]
    NoSpace {
        /// The directory.
        path: PathBuf,
        /// Bytes needed (with head room).
        need: u64,
        /// Bytes free.
        free: u64,
    },
    /// A program the agent runs (`ip`, `ctr`) failed.
    #[error("{what}: {detail}")]
    Command {
        /// The command line.
        what: String,
        /// Its exit status and error output.
        detail: String,
    },
    /// A konnectivity tunnel stream could not be set up or broke.
    #[error("konnectivity server {server}: {detail}")]
    Tunnel {
        /// The server address (`host:port`) dialed.
        server: String,
        /// What went wrong.
        detail: String,
    },
    /// Keys, CSRs or certificates.
    #[error("{what}: {detail}")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// The library's message.
        detail: String,
    },
}

impl Error {
    /// A closure for `map_err` recording `action` on `path`.
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

    /// Whether trying again later can help (network trouble, rate limits, operator errors);
    /// a malformed input or a refused token does not get better by retrying.
    pub fn retriable(&self) -> bool {
        match self {
            Error::Unreachable { .. }
            | Error::Timeout { .. }
            | Error::Tunnel { .. }
            | Error::Untrusted { .. }
            | Error::Download { .. } => true,
            Error::Refused { error, .. } => error.reason.retriable(),
            _ => false,
        }
    }
}

/// Short for `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
