//! A Kubernetes node joined by hand, without the agent (issue 9's first step): a tenant on
//! the site's standalone, the store filled by `tether-image containers`, and a node booted
//! from the image with the pinned runtime laid in and the files of
//! [`tether_agent::node`] written — what docs/decisions.md "A node joined by hand" records.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether_agent::node::{Layout, cni, containerd, kubelet};
use tether_testkit::nspawn::{Bind, Container, ContainerOptions};
use tether_upstream::{Cache, Component, Pins};

use crate::site::Site;

/// A tenant control plane of the site, as a node needs it.
pub struct Tenant {
    /// Its name (namespace `default`).
    pub name: String,
    /// The API endpoint nodes use.
    pub endpoint: String,
    /// The admin kubeconfig, written to a file.
    pub admin: PathBuf,
    /// The tenant's bootstrap token.
    pub token: String,
    /// The tenant CA (PEM).
    pub ca: String,
}

impl Tenant {
    /// Creates tenant `name` on the site and waits until it is Ready.
    pub fn create(site: &Site, name: &str) -> Tenant {
        let file = site.dir.join(format!("{name}.tcp.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\n\
                 metadata: {{name: {name}, namespace: default}}\n\
                 spec: {{kubernetes: {{version: {}}}}}\n",
                Pins::default().kubernetes
            ),
        )
        .unwrap();
        site.kubectl(&["apply", "-f", &file.display().to_string()])
            .unwrap();
        site.kubectl(&[
            "wait",
            &format!("tcp/{name}"),
            "--for=jsonpath={.status.phase}=Ready",
            "--timeout=180s",
        ])
        .unwrap_or_else(|e| panic!("tenant {name} not Ready: {e}\n{}", site.operator_log()));
        let get = |what: &str, path: &str| {
            site.kubectl(&["get", what, "-o", &format!("jsonpath={path}")])
                .unwrap()
        };
        let b64 = |s: String| {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .unwrap_or_else(|e| panic!("tenant {name}: not base64: {e}"));
            String::from_utf8(bytes).unwrap()
        };
        let admin = site.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &admin,
            b64(get(&format!("secret/{name}-admin-kubeconfig"), "{.data.*}")),
        )
        .unwrap();
        Tenant {
            name: name.to_string(),
            endpoint: get(&format!("tcp/{name}"), "{.status.endpoint}"),
            admin,
            token: b64(get(
                &format!("secret/{name}-bootstrap-token"),
                "{.data.token}",
            )),
            ca: b64(get(&format!("secret/{name}-pki"), "{.data.ca\\.crt}")),
        }
    }

    /// kubectl against the tenant.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        crate::site::kubectl(&self.admin, args)
    }

    /// Waits until `jsonpath` of `what` prints `want` (the last output on timeout).
    pub fn wait(
        &self,
        what: &str,
        jsonpath: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        self.wait_for(what, jsonpath, &[want], timeout).map(drop)
    }

    /// Waits until `jsonpath` of `what` prints one of `ends`; returns it (the last output
    /// on timeout).
    pub fn wait_for(
        &self,
        what: &str,
        jsonpath: &str,
        ends: &[&str],
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.kubectl(&["get", what, "-o", &format!("jsonpath={jsonpath}")]);
            if let Ok(g) = &got
                && ends.contains(&g.trim())
            {
                return Ok(g.trim().to_string());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what} {jsonpath}: wanted one of {ends:?}, got {got:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The pinned runtime binaries, hard-linked (else copied) into `dir/{bin,cni}` so a node
/// can bind them read-only.
pub fn runtime_dir(dir: &Path) -> (PathBuf, PathBuf) {
    let cache = Cache::from_env();
    let (bin, cni) = (dir.join("bin"), dir.join("cni"));
    for (d, components) in [
        (
            &bin,
            &[
                Component::Containerd,
                Component::ContainerdShimRuncV2,
                Component::Ctr,
                Component::Runc,
                Component::Kubelet,
            ][..],
        ),
        (
            &cni,
            &[
                Component::CniBridge,
                Component::CniHostLocal,
                Component::CniLoopback,
                Component::CniPortmap,
            ][..],
        ),
    ] {
        std::fs::create_dir_all(d).unwrap();
        for c in components {
            let from = cache
                .pinned(*c)
                .unwrap_or_else(|e| panic!("{e} (run `cargo xtask deps`)"));
            let to = d.join(c.name());
            if !to.exists() && std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).unwrap();
            }
        }
    }
    (bin, cni)
}

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
pub async fn join(
    node: &Container,
    tenant: &Tenant,
    store: &str,
    name: &str,
    container_node: bool,
) {
    let l = Layout::default();
    let pins = Pins::default();
    let sandbox = format!("registry.k8s.io/pause:{}", pins.pause);
    let files = [
        (
            "/etc/containerd/config.toml".to_string(),
            containerd::config(&containerd::Options {
                layout: &l,
                sandbox_image: &sandbox,
                restrict_oom_score_adj: container_node,
            }),
        ),
        (
            format!("{}/registry.k8s.io/hosts.toml", l.certs_dir),
            containerd::hosts_toml("registry.k8s.io", store),
        ),
        (
            format!(
                "{}/{}/hosts.toml",
                l.certs_dir,
                tether_image::containers::TEST_REGISTRY
            ),
            containerd::hosts_toml(tether_image::containers::TEST_REGISTRY, store),
        ),
        (
            format!("{}/pki/ca.crt", l.kubernetes_dir),
            tenant.ca.clone(),
        ),
        (
            format!("{}/bootstrap-kubelet.conf", l.kubernetes_dir),
            kubelet::bootstrap_kubeconfig(&l, &tenant.endpoint, &tenant.token),
        ),
        (
            format!("{}/config.yaml", l.kubelet_dir),
            kubelet::config(&kubelet::Options {
                layout: &l,
                cluster_dns: "10.96.0.10",
                cluster_domain: "cluster.local",
                container_node,
            }),
        ),
        (
            "/etc/systemd/system/containerd.service".to_string(),
            containerd::unit(&l),
        ),
        (
            "/etc/systemd/system/kubelet.service".to_string(),
            kubelet::unit(&l, name, None),
        ),
    ];
    for (path, text) in &files {
        node.write_file(path, text).unwrap();
    }
    let systemd = node.systemd();
    systemd.reload().await.unwrap();
    // The image still carries Debian's containerd; ours replaces its unit.
    systemd
        .restart_unit("containerd.service", crate::UNIT_TIMEOUT)
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
