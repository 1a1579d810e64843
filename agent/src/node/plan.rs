//! What a join puts on the node, as data: the files ([`files`]), where each artifact goes
//! ([`artifact_path`]) and which units a change of files restarts ([`restarts`]). Pure, so
//! the whole rendering is table-tested; [`super::install`] writes it.

use tether_api::machine_api::{ArtifactKind, Join, NodeArtifact};

use super::{Layout, cni, containerd, kubelet};

/// The marker naming the tenant whose software is on the node (written before anything
/// else is installed, removed after everything else is wiped).
pub const TENANT_MARKER: &str = "/var/lib/tether/tenant";
/// The containerd unit.
pub const CONTAINERD_UNIT: &str = "containerd.service";
/// The kubelet unit.
pub const KUBELET_UNIT: &str = "kubelet.service";
/// Where unit files go.
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// NTP servers from the desired config (systemd-timesyncd's drop-in).
pub const NTP_FILE: &str = "/etc/systemd/timesyncd.conf.d/50-tether.conf";
/// DNS servers from the desired config (systemd-resolved's drop-in).
pub const DNS_FILE: &str = "/etc/systemd/resolved.conf.d/50-tether.conf";
/// The pause image the image bakes in (an OCI layout tar).
pub const PAUSE_ARCHIVE: &str = "/usr/share/tether/images/pause.tar";

/// What the node is, beyond the join.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Host {
    /// A container on a cgroup v1 host (test nodes): see [`kubelet::Options`].
    pub container_on_cgroup_v1: bool,
}

/// One file: absolute path on the node, contents, mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Absolute path.
    pub path: String,
    /// Contents.
    pub contents: String,
    /// Permission bits.
    pub mode: u32,
}

fn file(path: impl Into<String>, contents: String, mode: u32) -> File {
    File {
        path: path.into(),
        contents,
        mode,
    }
}

/// Where `a` is installed.
pub fn artifact_path(l: &Layout, a: &NodeArtifact) -> String {
    match a.kind {
        ArtifactKind::Binary => format!("{}/{}", l.bin_dir, a.name),
        ArtifactKind::CniPlugin => format!("{}/{}", l.cni_bin_dir, a.name),
    }
}

/// The kubelet's bootstrap kubeconfig.
pub fn bootstrap_kubeconfig_path(l: &Layout) -> String {
    format!("{}/bootstrap-kubelet.conf", l.kubernetes_dir)
}

/// The kubelet's client certificate and key once bootstrapped (the kubelet keeps the
/// current pair behind this link).
pub fn client_cert_path(l: &Layout) -> String {
    format!("{}/pki/kubelet-client-current.pem", l.kubelet_dir)
}

/// The CNI network of a node whose Node has `pod_cidr`.
pub fn cni_file(l: &Layout, pod_cidr: &str) -> File {
    file(
        format!("{}/{}", l.cni_conf_dir, cni::FILE),
        cni::bridge_conflist(pod_cidr),
        0o644,
    )
}

/// Every file of `join` (the bootstrap kubeconfig only while the join carries a token).
pub fn files(l: &Layout, join: &Join, host: Host) -> Vec<File> {
    let mut out = vec![
        file(TENANT_MARKER, format!("{}\n", join.tenant), 0o644),
        file(
            "/etc/containerd/config.toml",
            containerd::config(&containerd::Options {
                layout: l,
                sandbox_image: &join.containerd.sandbox_image,
                restrict_oom_score_adj: host.container_on_cgroup_v1,
            }),
            0o644,
        ),
        file(
            format!("{UNIT_DIR}/{CONTAINERD_UNIT}"),
            containerd::unit(l),
            0o644,
        ),
    ];
    for m in &join.containerd.mirrors {
        out.push(file(
            format!("{}/{}/hosts.toml", l.certs_dir, m.registry),
            containerd::hosts_toml(&m.registry, &m.endpoint),
            0o644,
        ));
    }
    out.push(file(
        format!("{}/pki/ca.crt", l.kubernetes_dir),
        join.ca.clone(),
        0o644,
    ));
    if let Some(token) = &join.bootstrap_token {
        out.push(file(
            bootstrap_kubeconfig_path(l),
            kubelet::bootstrap_kubeconfig(l, &join.api_server, token),
            0o600,
        ));
    }
    out.push(file(
        format!("{}/config.yaml", l.kubelet_dir),
        kubelet::config(&kubelet::Options {
            layout: l,
            cluster_dns: &join.kubelet.cluster_dns,
            cluster_domain: &join.kubelet.cluster_domain,
            container_node: host.container_on_cgroup_v1,
            provider_id: Some(&join.kubelet.provider_id),
            taints: &join.kubelet.taints,
        }),
        0o644,
    ));
    if !join.ntp.is_empty() {
        out.push(file(
            NTP_FILE,
            format!("[Time]\nNTP={}\n", join.ntp.join(" ")),
            0o644,
        ));
    }
    if !join.dns.is_empty() {
        out.push(file(
            DNS_FILE,
            format!("[Resolve]\nDNS={}\n", join.dns.join(" ")),
            0o644,
        ));
    }
    out.push(file(
        format!("{UNIT_DIR}/{KUBELET_UNIT}"),
        kubelet::unit(
            l,
            &join.node_name,
            join.node_ip.as_deref(),
            &join.kubelet.labels,
        ),
        0o644,
    ));
    out
}

/// The units to restart after `changed` files were rewritten (a unit not running yet is
/// started anyway). containerd's restart leaves containers running (`KillMode=process`).
pub fn restarts(l: &Layout, changed: &[String]) -> (bool, bool) {
    let containerd = changed.iter().any(|p| {
        p.starts_with("/etc/containerd/") || p == &format!("{UNIT_DIR}/{CONTAINERD_UNIT}")
    });
    let kubelet = changed.iter().any(|p| {
        p.starts_with(l.kubelet_dir)
            || p.starts_with(l.kubernetes_dir)
            || p == &format!("{UNIT_DIR}/{KUBELET_UNIT}")
    });
    (containerd, kubelet)
}

/// The image's own services to restart after `changed` files were rewritten (time and name
/// servers from the desired config).
pub fn system_restarts(changed: &[String]) -> Vec<&'static str> {
    let mut out = Vec::new();
    if changed.iter().any(|p| p == NTP_FILE) {
        out.push("systemd-timesyncd.service");
    }
    if changed.iter().any(|p| p == DNS_FILE) {
        out.push("systemd-resolved.service");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::machine_api::{ContainerdSettings, KubeletSettings, Mirror};

    fn join(token: Option<&str>) -> Join {
        Join {
            tenant: "ns/t".into(),
            api_server: "https://10.0.0.1:6443".into(),
            ca: "CA PEM".into(),
            bootstrap_token: token.map(Into::into),
            kubernetes_version: "v1.36.0".into(),
            node_name: "m1".into(),
            node_ip: Some("10.0.0.7".into()),
            kubelet: KubeletSettings {
                cluster_dns: "10.96.0.10".into(),
                cluster_domain: "cluster.local".into(),
                labels: [("tether.dev/pool".to_string(), "w".to_string())].into(),
                taints: vec![],
                provider_id: "tether://m1".into(),
            },
            containerd: ContainerdSettings {
                sandbox_image: "registry.k8s.io/pause:3.10".into(),
                mirrors: vec![Mirror {
                    registry: "registry.k8s.io".into(),
                    endpoint: "10.0.0.1:5000".into(),
                }],
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_join_renders_every_file_once() {
        let l = Layout::default();
        let fs = files(&l, &join(Some("abcdef.0123456789abcdef")), Host::default());
        let paths: Vec<&str> = fs.iter().map(|f| f.path.as_str()).collect();
        for want in [
            TENANT_MARKER,
            "/etc/containerd/config.toml",
            "/etc/systemd/system/containerd.service",
            "/etc/containerd/certs.d/registry.k8s.io/hosts.toml",
            "/etc/kubernetes/pki/ca.crt",
            "/etc/kubernetes/bootstrap-kubelet.conf",
            "/var/lib/kubelet/config.yaml",
            "/etc/systemd/system/kubelet.service",
        ] {
            assert_eq!(paths.iter().filter(|p| **p == want).count(), 1, "{want}");
        }
        let unit = &fs
            .iter()
            .find(|f| f.path.ends_with(KUBELET_UNIT))
            .unwrap()
            .contents;
        assert!(unit.contains("--hostname-override=m1 --node-ip=10.0.0.7"));
        let bk = fs
            .iter()
            .find(|f| f.path.ends_with("bootstrap-kubelet.conf"))
            .unwrap();
        assert_eq!(bk.mode, 0o600, "the token is a secret");
        assert!(bk.contents.contains("abcdef.0123456789abcdef"));
        let without = files(&l, &join(None), Host::default());
        assert!(
            !without
                .iter()
                .any(|f| f.path.ends_with("bootstrap-kubelet.conf"))
        );
    }

    #[test]
    fn container_nodes_get_their_allowances() {
        let l = Layout::default();
        let host = Host {
            container_on_cgroup_v1: true,
        };
        let fs = files(&l, &join(None), host);
        let kc = &fs
            .iter()
            .find(|f| f.path.ends_with("config.yaml"))
            .unwrap()
            .contents;
        assert!(kc.contains("failCgroupV1"));
        let cc = &fs
            .iter()
            .find(|f| f.path.ends_with("config.toml"))
            .unwrap()
            .contents;
        assert!(cc.contains("restrict_oom_score_adj = true"));
    }

    #[test]
    fn changes_restart_what_reads_them() {
        let l = Layout::default();
        let p = |s: &str| vec![s.to_string()];
        assert_eq!(
            restarts(&l, &p("/etc/containerd/config.toml")),
            (true, false)
        );
        assert_eq!(
            restarts(&l, &p("/var/lib/kubelet/config.yaml")),
            (false, true)
        );
        assert_eq!(
            restarts(&l, &p("/etc/kubernetes/pki/ca.crt")),
            (false, true)
        );
        assert_eq!(restarts(&l, &p(TENANT_MARKER)), (false, false));
        assert_eq!(restarts(&l, &[]), (false, false));
    }

    #[test]
    fn artifacts_go_by_kind() {
        let l = Layout::default();
        let a = |kind| NodeArtifact {
            name: "x".into(),
            kind,
            ..Default::default()
        };
        assert_eq!(
            artifact_path(&l, &a(ArtifactKind::Binary)),
            "/var/lib/tether/bin/x"
        );
        assert_eq!(
            artifact_path(&l, &a(ArtifactKind::CniPlugin)),
            "/var/lib/tether/cni/bin/x"
        );
    }
}
