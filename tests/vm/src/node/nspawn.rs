//! The nspawn node: the image's rootfs under systemd-nspawn in its own network namespace on
//! the segment, allowed what a kubelet needs (test nodes only), with a NoCloud seed to
//! enroll with. The agent does the rest once a pool claims the machine.

use std::path::{Path, PathBuf};

use tether_testkit::nspawn::{Bind, Container, ContainerOptions};

use crate::site::Site;

/// An nspawn machine of the site's image that can become a Kubernetes node: enrolled from
/// `seed`, containerd's state on the host's disk (overlayfs cannot stack on the container's
/// overlay root, as the initramfs's bind does on a real machine).
pub async fn boot_kubernetes_node(
    site: &Site,
    name: &str,
    netns: &tether_testkit::NetNs,
    seed: &Path,
) -> Container {
    let state = site.dir.join("nodes").join(name).join("containerd");
    let _ = std::fs::remove_dir_all(&state);
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
                bind(seed, "/var/lib/cloud/seed/nocloud", true),
                bind(&state, "/var/lib/containerd", false),
            ],
            kubernetes_node: true,
        },
    )
    .await
    .expect("boot the image under systemd-nspawn as a Kubernetes node")
}

/// The container logs of pod `ns/name` as the node keeps them: what a test reads when the
/// tunnel is not the point (`kubectl logs` goes through it; tunnel.rs tests that).
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
