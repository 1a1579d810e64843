//! What makes a machine a Kubernetes node: the files containerd, the kubelet and CNI read.
//! Pure renderers with table tests. Today the node-runtime test writes them into a node
//! by hand (the way an operator would follow docs/decisions.md "A node joined by hand");
//! the agent's install step writes them once WorkerPools exist (planned).

pub mod cni;
pub mod containerd;
pub mod download;
pub mod kubelet;

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
