//! The harness's one error type.

use std::path::PathBuf;

/// Everything the harness can fail at. Start-up failures carry the component's log tail so
/// a red test says why without digging through temp dirs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pinned upstream binary is not in the cache.
    #[error(transparent)]
    Upstream(#[from] tether_upstream::Error),
    /// A filesystem or process operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A required host tool or package is missing.
    #[error("{tool} is not installed ({hint})")]
    MissingTool { tool: String, hint: String },
    /// An external command exited non-zero.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// A component did not become ready in time.
    #[error("{component} not ready after {seconds}s: {reason}\n--- last log lines ---\n{log_tail}")]
    NotReady {
        component: String,
        seconds: u64,
        reason: String,
        log_tail: String,
    },
    /// A component exited while it should be running.
    #[error("{component} exited ({status})\n--- last log lines ---\n{log_tail}")]
    Exited {
        component: String,
        status: String,
        log_tail: String,
    },
    /// An operator helper (certificates, kubeconfigs, files) failed.
    #[error(transparent)]
    Operator(#[from] tether_operator::Error),
    /// Building a Kubernetes client failed.
    #[error("kube client: {0}")]
    Kube(String),
    /// D-Bus to a container's systemd failed.
    #[error("container {name}: {detail}")]
    Container { name: String, detail: String },
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// Result alias for the harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;
