//! The agent's one error type.

/// Everything the agent can fail at, with enough context to act on from a log line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A D-Bus call to systemd failed.
    #[error("systemd: {action}: {source}")]
    Systemd {
        action: String,
        #[source]
        source: zbus::Error,
    },
    /// A systemd job finished with a result other than `done`.
    #[error("systemd job for {unit} finished with result {result:?}")]
    JobFailed { unit: String, result: String },
    /// Waiting for systemd took longer than allowed.
    #[error("timed out after {seconds}s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
}
