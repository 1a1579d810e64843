//! The crate's one error type. Every variant names the value that was refused (shortened)
//! and why, so a log line or an HTTP error body is enough to act on.

/// A value of the node contract that does not parse or is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value failed validation.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// What kind of value (`MAC address`, `CA pin`, …).
        what: &'static str,
        /// The offending value, at most 80 characters of it.
        value: String,
        /// Why it was refused.
        why: String,
    },
    /// The image manifest's signature or key did not check out.
    #[error("manifest signature: {0}")]
    Signature(String),
    /// A certificate could not be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The operating system gave no randomness.
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// Short for `Result<T, Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Invalid`] for `value` (kept short: it may be hostile and is logged).
    pub fn invalid(what: &'static str, value: &str, why: impl Into<String>) -> Error {
        Error::Invalid {
            what,
            value: value.chars().take(80).collect(),
            why: why.into(),
        }
    }
}
