use std::path::PathBuf;

/// Everything that can go wrong while finding or building an upstream binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation on the cache failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A cached binary is missing and the caller asked not to build.
    #[error(
        "{component} {version} is not in the binary cache ({path}); run `cargo xtask deps` to build it"
    )]
    Missing {
        component: String,
        version: String,
        path: PathBuf,
    },
    /// `go` could not be run or returned an error.
    #[error("`go {args}` failed in {dir}: {detail}")]
    Go {
        args: String,
        dir: PathBuf,
        detail: String,
    },
    /// The installed Go is older than the module needs.
    #[error("{module} {version} needs Go {needed}, but the installed toolchain is {installed}")]
    GoTooOld {
        module: String,
        version: String,
        needed: String,
        installed: String,
    },
    /// The host lacks something Tether needs, or apt failed.
    #[error("host: {0}")]
    Host(String),
    /// A version string is not of the form the pins use.
    #[error("invalid version {0:?}: expected vMAJOR.MINOR.PATCH")]
    BadVersion(String),
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
