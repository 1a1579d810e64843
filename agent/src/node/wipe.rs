//! Wiping every trace of a tenant (DESIGN.md "Lifecycle"): what a released machine does
//! before it is free for another tenant, and what a node does before joining a tenant other
//! than the one its marker names. In order, so a kill at any point leaves a node the next
//! wipe finishes: stop the kubelet, the pods (`kubepods.slice`), containerd and its shims;
//! unmount what containers left mounted; remove the pod network and routes; delete the
//! state, configuration, certificates, images and binaries; the tenant marker last.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::plan::{self, CONTAINERD_UNIT, KUBELET_UNIT, UNIT_DIR};
use super::{Layout, cni, routes};
use crate::error::{Error, Result};
use crate::systemd::Systemd;

const UNIT_TIMEOUT: Duration = Duration::from_secs(90);
/// The slice the kubelet (systemd cgroup driver) puts every pod under.
const PODS_SLICE: &str = "kubepods.slice";

/// Directories under which mounts are the tenant's (container rootfs, volumes, netns).
pub fn mount_roots(l: &Layout) -> Vec<String> {
    vec![
        l.kubelet_dir.to_string(),
        "/run/containerd".into(),
        "/var/lib/containerd".into(),
        "/run/netns".into(),
    ]
}

/// What is removed; `/var/lib/containerd` is a mount point (the state partition or tmpfs),
/// so its contents go, not the directory.
pub fn removals(l: &Layout) -> (Vec<String>, Vec<String>) {
    let whole = vec![
        l.kubelet_dir.to_string(),
        l.kubernetes_dir.to_string(),
        "/etc/containerd".into(),
        format!("{}/{}", l.cni_conf_dir, cni::FILE),
        "/var/lib/cni".into(),
        "/run/containerd".into(),
        "/var/log/pods".into(),
        "/var/log/containers".into(),
        format!("{UNIT_DIR}/{CONTAINERD_UNIT}"),
        format!("{UNIT_DIR}/{KUBELET_UNIT}"),
        plan::NTP_FILE.into(),
        plan::DNS_FILE.into(),
        l.bin_dir.to_string(),
        // The CNI plugins' directory and the one the agent made for it.
        std::path::Path::new(l.cni_bin_dir)
            .parent()
            .filter(|p| p != &std::path::Path::new("/var/lib/tether"))
            .unwrap_or(std::path::Path::new(l.cni_bin_dir))
            .to_string_lossy()
            .into_owned(),
    ];
    // Every CNI network configuration goes, an add-on's too (one may hold a credential).
    (
        whole,
        vec!["/var/lib/containerd".into(), l.cni_conf_dir.to_string()],
    )
}

/// Mount points below any of `roots` in a `mountinfo` text, deepest first (field 5 is
/// the mount point, with spaces and the like escaped as `\ooo`).
pub fn mounts_below(mountinfo: &str, roots: &[String]) -> Vec<String> {
    let mut out: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|m| {
            roots.iter().any(|r| {
                m.strip_prefix(r.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out.sort_by_key(|m| std::cmp::Reverse(m.matches('/').count()));
    out
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Wipes the tenant from the node under `root`.
pub async fn wipe(root: &Path, l: &Layout, systemd: &Systemd) -> Result<()> {
    tracing::info!("wiping the tenant from the node");
    systemd.stop_unit(KUBELET_UNIT, UNIT_TIMEOUT).await?;
    // The pods had their graceful end in the drain; what is left is killed outright (a
    // container's PID 1 that ignores SIGTERM would hold a graceful stop for 90 s).
    if let Err(e) = systemd.kill_all(PODS_SLICE).await {
        tracing::warn!("wipe: {e}");
    }
    systemd.stop_unit(PODS_SLICE, UNIT_TIMEOUT).await?;
    systemd.stop_unit(CONTAINERD_UNIT, UNIT_TIMEOUT).await?;
    // containerd's shims (left by `KillMode=process`): their containers are gone with the
    // pods' slice; a shim that cannot be signalled is logged, not fatal.
    if let Err(e) = systemd.kill_all(CONTAINERD_UNIT).await {
        tracing::warn!("wipe: {e}");
    }
    // The agent's unit has a mount namespace of its own (PrivateTmp, ProtectHome): the
    // mounts to undo are the system's, seen and unmounted in PID 1's namespace.
    let info = std::fs::read_to_string("/proc/1/mountinfo")
        .map_err(Error::io("read", "/proc/1/mountinfo"))?;
    let roots: Vec<String> = mount_roots(l)
        .iter()
        .map(|r| crate::inputs::under(root, r).to_string_lossy().into_owned())
        .collect();
    for m in mounts_below(&info, &roots) {
        let out = tokio::process::Command::new("nsenter")
            .args(["--mount=/proc/1/ns/mnt", "--", "umount", "--lazy", &m])
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                tracing::warn!(mount = %m, "unmount: {}", String::from_utf8_lossy(&o.stderr).trim())
            }
            Err(e) => tracing::warn!(mount = %m, "unmount: {e}"),
        }
    }
    // Nothing is deleted through a mount that is still there (a volume's data, a host
    // path): the wipe fails and the next pass tries again.
    let info = std::fs::read_to_string("/proc/1/mountinfo")
        .map_err(Error::io("read", "/proc/1/mountinfo"))?;
    if let Some(m) = mounts_below(&info, &roots).first() {
        return Err(Error::Command {
            what: "wipe".into(),
            detail: format!("{m} is still mounted; nothing under it was deleted"),
        });
    }
    routes::converge(&[]).await?;
    delete_link("cni0").await;
    let (whole, contents) = removals(l);
    for p in whole {
        remove(&crate::inputs::under(root, &p))?;
    }
    for d in contents {
        let dir = crate::inputs::under(root, &d);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                remove(&e.path())?;
            }
        }
    }
    systemd.reload().await?;
    remove(&crate::inputs::under(root, plan::TENANT_MARKER))?;
    tracing::info!("the node holds nothing of any tenant");
    Ok(())
}

fn remove(p: &PathBuf) -> Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Err(_) => return Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", p)(e)),
        _ => Ok(()),
    }
}

/// Deletes network link `name` if it exists (the CNI bridge).
async fn delete_link(name: &str) {
    let _ = tokio::process::Command::new("ip")
        .args(["link", "del", name])
        .output()
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_below_the_roots_deepest_first() {
        let info = "\
22 1 0:21 / / rw shared:1 - overlay overlay rw
30 22 0:30 / /var/lib/kubelet rw - tmpfs tmpfs rw
31 22 0:31 / /var/lib/kubelet/pods/uid/volumes/kubernetes.io~projected/kube-api-access rw - tmpfs tmpfs rw
32 22 0:32 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw - overlay overlay rw
33 22 0:33 / /run/netns/cni-1234 rw - nsfs nsfs rw
34 22 0:34 / /var/lib/containerd rw - tmpfs tmpfs rw
35 22 0:35 / /var/lib/kubeletx rw - tmpfs tmpfs rw
36 22 0:36 / /run/containerd/with\\040space rw - tmpfs tmpfs rw
";
        let l = Layout::default();
        let got = mounts_below(info, &mount_roots(&l));
        assert_eq!(
            got,
            [
                "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~projected/kube-api-access",
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs",
                "/run/containerd/with space",
                "/run/netns/cni-1234",
            ]
        );
        assert!(
            !got.contains(&"/var/lib/containerd".to_string()),
            "the state bind itself stays"
        );
    }

    #[test]
    fn wipes_every_trace_but_keeps_the_state_mount() {
        let l = Layout::default();
        let (whole, contents) = removals(&l);
        for p in [
            "/var/lib/kubelet",
            "/etc/kubernetes",
            "/etc/containerd",
            "/etc/cni/net.d/10-tether.conflist",
            "/var/lib/tether/bin",
            "/var/lib/tether/cni",
            "/etc/systemd/system/kubelet.service",
        ] {
            assert!(whole.iter().any(|w| w == p), "{p}");
        }
        assert!(!whole.iter().any(|w| w == "/var/lib/containerd"));
        assert_eq!(contents, ["/var/lib/containerd", "/etc/cni/net.d"]);
        assert!(
            !whole.iter().any(|w| w == plan::TENANT_MARKER),
            "the marker goes last, apart"
        );
    }
}
