//! xtask's one error type.

/// Everything an xtask command can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Finding, building or installing an upstream part failed.
    #[error(transparent)]
    Upstream(#[from] tether_upstream::Error),
    /// The test harness failed (used by `up`).
    #[error(transparent)]
    Testkit(#[from] tether_testkit::Error),
    /// A step's command failed.
    #[error("{step} failed: {detail}")]
    Step { step: String, detail: String },
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}
