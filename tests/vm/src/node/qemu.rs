//! The qemu node: the image booted under TCG on the segment (its own kernel, cgroup v2),
//! joined by `join.sh`, which the kernel runs through systemd's stock
//! `systemd.run=` generator from the first virtio disk — no agent, no test unit in the image.
//! The second disk is a squashfs of what the test prepared ([`prepare`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use tether_agent::node::{Layout, cni};
use tether_image::node_artifacts::NodeArtifact;
use tether_testkit::qemu::Vm;
use tether_upstream::{Cache, Component, Module};

use super::{Tenant, node_files};
use crate::site::Site;

const JOIN: &str = include_str!("join.sh");
const ROUTES: &str = include_str!("routes.sh");

/// The kernel command line words that run `join.sh` from `/dev/vda` once systemd is up,
/// and keep the machine running (the generator's default is to power off when the
/// command ends) in its usual target.
pub const RUN_JOIN: &str = "systemd.run=\"/bin/sh /dev/vda\" systemd.run_success_action=none \
     systemd.run_failure_action=none systemd.unit=multi-user.target \
     systemd.wants=kernel-command-line.service";

/// RAM of a qemu node: a diskless node keeps its downloaded runtime, containerd's images
/// and the pods' writable layers in RAM.
pub const MEMORY_MIB: u32 = 2560;

/// The two disks of node `name`: (`join.sh`, the payload squashfs).
pub struct Disks {
    /// The script, as a raw disk (padded to whole sectors).
    pub script: PathBuf,
    /// The payload squashfs.
    pub payload: PathBuf,
}

/// Prepares node `name`'s disks: where its runtime is in `store` (`artifacts`, pushed by
/// `tether-image node-artifacts`), its files for `tenant` pulling through `store`, kubectl
/// with a token that may read Nodes (for its podCIDR and the host-gw routes), ctr (to
/// import the image's pause), and the scripts.
pub fn prepare(
    site: &Site,
    tenant: &Tenant,
    store: &str,
    artifacts: &[NodeArtifact],
    name: &str,
) -> Disks {
    let dir = site.dir.join("nodes").join(name);
    let tree = dir.join("payload");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("root")).unwrap();
    std::fs::write(tree.join("artifacts"), artifact_list(artifacts)).unwrap();
    // Tools of the by-hand join (a node runs neither; the agent will talk to the API and
    // to containerd itself).
    for tool in [Component::Kubectl, Component::Ctr] {
        let from = Cache::from_env().pinned(tool).unwrap();
        link(&from, &tree.join(tool.name()));
    }
    for (path, text) in node_files(tenant, store, name, false) {
        let to = tree.join("root").join(path.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(&to, text).unwrap();
    }
    std::fs::write(tree.join("conflist.in"), cni::bridge_conflist("@POD_CIDR@")).unwrap();
    std::fs::write(tree.join("env"), format!("NAME={name}\nSTORE={store}\n")).unwrap();
    std::fs::write(tree.join("nodes.kubeconfig"), node_reader(tenant)).unwrap();
    std::fs::write(tree.join("routes.sh"), ROUTES).unwrap();

    let payload = dir.join("payload.squashfs");
    let _ = std::fs::remove_file(&payload);
    // Uncompressed: the binaries barely compress and TCG pays for every decompression.
    run(Command::new("mksquashfs").arg(&tree).arg(&payload).args([
        "-noappend",
        "-quiet",
        "-noI",
        "-noD",
        "-noF",
        "-noX",
        "-all-root",
    ]));
    let script = dir.join("join.disk");
    let mut bytes = JOIN.as_bytes().to_vec();
    bytes.resize(bytes.len().div_ceil(4096) * 4096, b'\n');
    std::fs::write(&script, bytes).unwrap();
    Disks { script, payload }
}

/// Boots node `name` (with `mac` on the segment) from the image's kernel and combined
/// initrd with `disks`; it joins by itself.
pub fn boot(site: &Site, name: &str, mac: &str, disks: &Disks) -> Vm {
    let initrd = site.combined_initrd();
    site.vm_on_segment(name, mac, MEMORY_MIB)
        .direct_boot(
            &site.image.dir.join("vmlinux"),
            &initrd,
            &format!("{} {RUN_JOIN}", site.image.manifest.cmdline),
        )
        .args([
            "-drive".to_string(),
            format!(
                "file={},if=virtio,format=raw,readonly=on",
                disks.script.display()
            ),
            "-drive".to_string(),
            format!(
                "file={},if=virtio,format=raw,readonly=on",
                disks.payload.display()
            ),
        ])
        .spawn()
        .expect("start qemu")
}

/// A kubeconfig for a ServiceAccount that may get and list Nodes (the kubelet's own
/// credentials may read only its own Node, and the routes need all of them).
fn node_reader(tenant: &Tenant) -> String {
    let rbac = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: hostgw, namespace: kube-system}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: hostgw}\n\
         rules: [{apiGroups: [\"\"], resources: [nodes], verbs: [get, list]}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: hostgw}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: hostgw}\n\
         subjects: [{kind: ServiceAccount, name: hostgw, namespace: kube-system}]\n";
    let file = tenant.admin.with_extension("hostgw.yaml");
    std::fs::write(&file, rbac).unwrap();
    tenant
        .kubectl(&["apply", "-f", &file.display().to_string()])
        .unwrap();
    let token = tenant
        .kubectl(&[
            "-n",
            "kube-system",
            "create",
            "token",
            "hostgw",
            "--duration=2h",
        ])
        .unwrap();
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(&tenant.ca);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: hostgw\n  user:\n    token: {}\n\
         contexts:\n- name: t\n  context: {{cluster: t, user: hostgw}}\ncurrent-context: t\n",
        tenant.endpoint,
        token.trim()
    )
}

/// `join.sh`'s download list: one line per binary — directory under `/var/lib/tether`,
/// file name, sha256, size, blob path in the store.
fn artifact_list(artifacts: &[NodeArtifact]) -> String {
    let layout = Layout::default();
    artifacts
        .iter()
        .map(|a| {
            let dir = if a.component.module() == Module::CniPlugins {
                layout.cni_bin_dir
            } else {
                layout.bin_dir
            };
            format!(
                "{} {} {} {} {}\n",
                dir.trim_start_matches("/var/lib/tether/"),
                a.component.name(),
                a.blob.trim_start_matches("sha256:"),
                a.size,
                a.blob_path()
            )
        })
        .collect()
}

fn link(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    /// The scripts parse (a stray quote otherwise shows only as a failed boot minutes in).
    #[test]
    fn scripts_parse() {
        for (name, script) in [("join.sh", super::JOIN), ("routes.sh", super::ROUTES)] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
