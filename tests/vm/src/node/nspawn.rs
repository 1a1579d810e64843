//! The nspawn node: the image's rootfs under systemd-nspawn in its own network namespace on
//! the segment, the runtime bound in read-only, files written and units started over D-Bus.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether_agent::node::{Layout, cni};
use tether_testkit::nspawn::{Bind, Container, ContainerOptions};

use super::{Tenant, runtime_dir};
use crate::site::Site;

/// An nspawn node of the site's image, runtime bound in, containerd's state on the host's
/// disk (overlayfs cannot stack on the container's overlay root).
pub async fn boot_nspawn_node(site: &Site, name: &str, netns: &tether_testkit::NetNs) -> Container {
    let layout = Layout::default();
    let (bin, cni) = runtime_dir(&site.dir.join("runtime"));
    let state = site.dir.join("nodes").join(name).join("containerd");
    std::fs::create_dir_all(&state).unwrap();
    let bind = |host: &Path, container: &str, read_only| Bind {
        host: host.to_path_buf(),
        container: PathBuf::from(container),
        read_only,
    };
    Container::boot(
        &site.rootfs(),
        ContainerOptions {
            netns: Some(netns),
            binds: vec![
                bind(&bin, layout.bin_dir, true),
                bind(&cni, layout.cni_bin_dir, true),
                bind(&state, "/var/lib/containerd", false),
            ],
            kubernetes_node: true,
        },
    )
    .await
    .expect("boot the image under systemd-nspawn as a Kubernetes node")
}

/// Writes containerd's and the kubelet's files into `node` and starts both: the node joins
/// `tenant` as `name` through TLS bootstrapping, pulling through `store`.
pub async fn join(node: &Container, tenant: &Tenant, store: &str, name: &str) {
    for (path, text) in &super::node_files(tenant, store, name, true) {
        node.write_file(path, text).unwrap();
    }
    let systemd = node.systemd();
    systemd.reload().await.unwrap();
    systemd
        .start_unit("containerd.service", crate::UNIT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("containerd: {e}\n{}", node.journal("containerd", 30)));
    systemd
        .start_unit("kubelet.service", crate::UNIT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("kubelet: {e}\n{}", node.journal("kubelet", 30)));
}

/// Once the Node has its `podCIDR`, writes the bridge network for it; returns the CIDR.
pub fn write_cni(node: &Container, tenant: &Tenant, name: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let cidr = loop {
        if let Ok(c) = tenant.kubectl(&["get", "node", name, "-o", "jsonpath={.spec.podCIDR}"])
            && !c.trim().is_empty()
        {
            break c.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "node {name} has no podCIDR after {timeout:?}:\n{}",
            node.journal("kubelet", 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let l = Layout::default();
    node.write_file(
        format!("{}/{}", l.cni_conf_dir, cni::FILE),
        &cni::bridge_conflist(&cidr),
    )
    .unwrap();
    cidr
}

/// The container logs of pod `ns/name` as the node keeps them (`kubectl logs` needs the
/// konnectivity tunnel, which nodes do not run yet).
pub fn pod_log(node: &Container, ns: &str, name: &str) -> String {
    let pods = node.path("/var/log/pods");
    let Ok(dirs) = std::fs::read_dir(&pods) else {
        return format!("(no {})", pods.display());
    };
    let prefix = format!("{ns}_{name}_");
    let mut out = String::new();
    for d in dirs.flatten() {
        if !d.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        for c in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(c.path()).into_iter().flatten().flatten() {
                out += &std::fs::read_to_string(f.path()).unwrap_or_default();
            }
        }
    }
    out
}
