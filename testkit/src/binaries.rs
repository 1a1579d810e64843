//! Finding the pinned upstream binaries the harness runs.

use std::path::PathBuf;

use tether_upstream::{Builder, Cache, Component, Pins};

use crate::Result;

/// The cached binary of `component` at its default pinned version. A missing binary is an
/// error that says to run `cargo xtask deps`: tests never skip silently.
pub fn binary(component: Component) -> Result<PathBuf> {
    Ok(Cache::from_env().pinned(component)?)
}

/// The binary of `component` for Kubernetes `kubernetes`, built now if it is not cached yet
/// (used for the previous minor in upgrade tests, which `deps` does not build eagerly).
pub fn binary_for(component: Component, kubernetes: &str) -> Result<PathBuf> {
    let version = Pins::default().version_for(component, kubernetes)?;
    Ok(Builder::new(Cache::from_env())
        .ensure(component, &version)?
        .path)
}
