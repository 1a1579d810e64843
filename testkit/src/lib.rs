//! Real parts for Tether's tests.
//!
//! Nothing here is a mock: [`cluster`] runs the pinned upstream etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler; [`netns`] makes real network namespaces,
//! bridges, veth pairs and taps; [`nspawn`] boots a root filesystem with real systemd under
//! `systemd-nspawn` and talks to it over D-Bus. Every helper cleans up on drop and removes
//! leftovers of killed runs ([`state`]). A missing binary or tool is an error that says what
//! to install, never a skipped test. Certificates, kubeconfigs, free ports and the
//! kube-apiserver and etcd flags come from `tether-operator`, so tests run what it runs.

pub mod binaries;
pub mod cluster;
pub mod error;
pub mod netns;
pub mod nspawn;
pub mod ports;
pub mod process;
pub mod published;
pub mod qemu;
pub mod rootfs;
pub mod segment;
pub mod state;

pub use cluster::{ClusterOptions, Etcd, TestCluster};
pub use error::{Error, Result};
pub use netns::NetNs;
pub use nspawn::Container;

/// A fresh temporary directory named `<prefix>…`, kept after the test when
/// `TETHER_KEEP_TEST_DIRS` is set (its path is printed) so logs and certificates can be read.
pub fn test_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(error::Error::io("create temp dir", std::env::temp_dir()))?;
    if std::env::var_os("TETHER_KEEP_TEST_DIRS").is_some() {
        eprintln!("keeping test dir {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    Ok(dir)
}
