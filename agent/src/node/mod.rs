//! What makes a machine a Kubernetes node of its pool's tenant.
//!
//! - Pure renderers with table tests: [`containerd`], [`kubelet`], [`cni`] (the files each
//!   reads) and [`plan`] (every file of a join, where binaries go, what a change restarts);
//! - edges: [`download`] (resumable, verified downloads from the store), [`install`] (the
//!   named steps from a desired join to a Ready Node), [`own_node`] (the Node as the kubelet
//!   sees it), [`routes`] (host-gw routes), [`wipe`] (everything of a tenant gone).

pub mod cni;
pub mod containerd;
pub mod download;
pub mod install;
pub mod kubelet;
pub mod own_node;
pub mod plan;
pub mod routes;
pub mod wipe;

/// Where the node runtime lives. The image's `/usr` and `/opt` are read-only, so binaries
/// go under `/var/lib/tether` (the `/var` overlay, on the state partition or a tmpfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// containerd, its shim, runc, ctr, kubelet.
    pub bin_dir: &'static str,
    /// CNI plugins.
    pub cni_bin_dir: &'static str,
    /// CNI network configurations.
    pub cni_conf_dir: &'static str,
    /// containerd's per-registry `hosts.toml` directories.
    pub certs_dir: &'static str,
    /// The tenant CA, bootstrap and kubelet kubeconfigs.
    pub kubernetes_dir: &'static str,
    /// The kubelet's state and `config.yaml`.
    pub kubelet_dir: &'static str,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            bin_dir: "/var/lib/tether/bin",
            cni_bin_dir: "/var/lib/tether/cni/bin",
            cni_conf_dir: "/etc/cni/net.d",
            certs_dir: "/etc/containerd/certs.d",
            kubernetes_dir: "/etc/kubernetes",
            kubelet_dir: "/var/lib/kubelet",
        }
    }
}

impl Layout {
    /// A binary in [`Layout::bin_dir`].
    pub fn bin(&self, name: &str) -> String {
        format!("{}/{name}", self.bin_dir)
    }
}
