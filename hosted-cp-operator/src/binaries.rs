//! The pinned upstream binaries the operator runs itself (etcd, kube-apiserver and etcdctl
//! for standalone mode and datastore administration), from the binary cache.

use std::path::PathBuf;

use tether_upstream::{Cache, Component, Pins};

use crate::error::Error;

/// The cached binary of `component` at the default pins.
pub fn binary(component: Component) -> Result<PathBuf, Error> {
    Ok(Cache::from_env().pinned(component)?)
}

/// etcdctl.
pub fn etcdctl() -> Result<PathBuf, Error> {
    binary(Component::Etcdctl)
}

/// Kubernetes versions the operator can run: those whose kube-apiserver is in the cache
/// (the default pin always counts, so a missing binary is a clear start error instead).
pub fn known_versions() -> Vec<String> {
    let pins = Pins::default();
    let cache = Cache::from_env();
    let mut out = vec![pins.kubernetes.to_string()];
    if cache
        .lookup(Component::KubeApiserver, pins.kubernetes_previous)
        .is_ok()
    {
        out.push(pins.kubernetes_previous.to_string());
    }
    out
}
