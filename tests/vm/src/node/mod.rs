//! Kubernetes nodes joined by hand, without the agent (issue 9's first step): a tenant on
//! the site's standalone, the store filled by `tether-image containers`, and machines of the
//! image with the pinned runtime laid in and the files of [`tether_agent::node`] written —
//! an nspawn node ([`nspawn`]) and a qemu node run by a shell script ([`qemu`]); what
//! docs/decisions.md "A node joined by hand" records.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether_agent::node::{Layout, containerd, kubelet};
use tether_upstream::{Cache, Component, Pins};

pub mod nspawn;
pub mod qemu;

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

/// The files that make a machine node `name` of `tenant`, pulling through `store`: (path on
/// the node, contents). `container_node` for nspawn nodes on this host (cgroup v1, no
/// `CAP_SYS_RESOURCE`; docs/decisions.md "A node joined by hand").
pub fn node_files(
    tenant: &Tenant,
    store: &str,
    name: &str,
    container_node: bool,
) -> Vec<(String, String)> {
    let l = Layout::default();
    let pins = Pins::default();
    let sandbox = format!("registry.k8s.io/pause:{}", pins.pause);
    vec![
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
    ]
}

/// Every Node's `podCIDR` and InternalIP (Nodes without either yet are left out).
pub fn pod_networks(tenant: &Tenant) -> Vec<(String, String)> {
    let out = tenant
        .kubectl(&[
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}"#,
        ])
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let (cidr, ip) = l.trim().split_once(' ')?;
            Some((cidr.to_string(), ip.to_string()))
        })
        .collect()
}
