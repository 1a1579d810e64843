//! The operator's one error type.

use std::path::{Path, PathBuf};

/// Everything the operator can fail at, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A feature that a later issue delivers.
    #[error("{0} is not implemented yet")]
    NotYet(&'static str),
    /// Rendering a manifest failed.
    #[error("render {what}: {source}")]
    Render {
        /// What was rendered.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: serde_yaml::Error,
    },
    /// JSON (de)serialisation failed.
    #[error("{what}: {source}")]
    Json {
        /// What was (de)serialised.
        what: String,
        /// Why it failed.
        #[source]
        source: serde_json::Error,
    },
    /// Generating or parsing certificates and keys failed.
    #[error("PKI: {what}: {detail}")]
    Pki {
        /// The step.
        what: &'static str,
        /// The cause.
        detail: String,
    },
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// The call.
        what: String,
        /// Why it failed.
        #[source]
        source: kube::Error,
    },
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// An external command (etcdctl, psql, a component binary) failed.
    #[error("{command}: {detail}")]
    Command {
        /// What ran.
        command: String,
        /// Its stderr or exit status.
        detail: String,
    },
    /// The spec or a referenced object is not acceptable; nothing was changed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A binary the operator needs is not in the cache.
    #[error("binary: {0}")]
    Binary(#[from] tether_upstream::Error),
    /// Waiting for something took too long.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// A reconcile step ran before the step that prepares what it needs (a bug in the
    /// pipeline's order, reported instead of panicking the controller).
    #[error("pipeline: the {0} step has not run yet")]
    StepOrder(&'static str),
    /// An object the operator would write already exists and belongs to someone else;
    /// it was left alone.
    #[error("conflict: {0}")]
    Conflict(String),
}

impl Error {
    /// A closure that wraps an I/O error on `path`.
    pub fn io(op: &'static str, path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        move |source| Error::Io { op, path, source }
    }

    /// A closure that wraps an rcgen error.
    pub fn pki(what: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
        move |e| Error::Pki {
            what,
            detail: e.to_string(),
        }
    }

    /// A closure that wraps a kube error.
    pub fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Kube { what, source }
    }
}
