//! The operator's one error type.

/// Everything the operator can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A feature that a later issue delivers.
    #[error("{0} is not implemented yet")]
    NotYet(&'static str),
    /// Rendering a manifest failed.
    #[error("render {what}: {source}")]
    Render {
        what: &'static str,
        #[source]
        source: serde_yaml::Error,
    },
}
