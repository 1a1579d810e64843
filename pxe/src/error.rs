//! The PXE server's one error type.

/// Everything tether-pxe can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A feature that a later issue delivers.
    #[error("{0} is not implemented yet")]
    NotYet(&'static str),
}
