//! Kubernetes nodes of the site: a tenant on the site's standalone ([`Tenant`]), WorkerPools
//! that claim machines for it ([`apply_pool`]), and nspawn nodes of the image that the
//! agent joins ([`nspawn`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tether_upstream::Pins;

pub mod nspawn;
pub mod tunnel;

use crate::site::Site;

/// A tenant control plane of the site, as a node needs it.
pub struct Tenant {
    /// Its name (namespace `default`).
    pub name: String,
    /// The API endpoint nodes use.
    pub endpoint: String,
    /// The admin kubeconfig, written to a file.
    pub admin: PathBuf,
}

impl Tenant {
    /// Creates tenant `name` on the site and waits until it is Ready.
    pub fn create(site: &Site, name: &str) -> Tenant {
        Tenant::try_create(site, name, Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("tenant {name}: {e}\n{}", site.operator_log()))
    }

    /// Creates tenant `name` (the pinned Kubernetes version) on the site, waits up to
    /// `timeout` until it is Ready and writes its admin kubeconfig to `<dir>/<name>.kubeconfig`.
    pub fn try_create(site: &Site, name: &str, timeout: Duration) -> Result<Tenant, String> {
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
        .map_err(|e| format!("write {}: {e}", file.display()))?;
        site.kubectl(&["apply", "-f", &file.display().to_string()])?;
        site.kubectl(&[
            "wait",
            &format!("tcp/{name}"),
            "--for=jsonpath={.status.phase}=Ready",
            &format!("--timeout={}s", timeout.as_secs()),
        ])
        .map_err(|e| format!("not Ready: {e}"))?;
        let get = |what: &str, path: &str| {
            site.kubectl(&["get", what, "-o", &format!("jsonpath={path}")])
        };
        let encoded = get(&format!("secret/{name}-admin-kubeconfig"), "{.data.*}")?;
        let admin_kubeconfig = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| format!("admin kubeconfig: not base64: {e}"))?
        };
        let admin = site.dir.join(format!("{name}.kubeconfig"));
        // Owner-only, whole or not at all: the operator's own writer for credentials.
        tether_operator::fs::write_atomic(&admin, &admin_kubeconfig).map_err(|e| e.to_string())?;
        Ok(Tenant {
            name: name.to_string(),
            endpoint: get(&format!("tcp/{name}"), "{.status.endpoint}")?,
            admin,
        })
    }

    /// A client for the tenant as its admin (made on the caller's runtime).
    pub async fn client(&self) -> kube::Client {
        let kc = std::fs::read_to_string(&self.admin).unwrap();
        tether_operator::kube::client_from_kubeconfig(&kc)
            .await
            .unwrap()
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

/// What a qemu node's serial console shows as it boots and joins, in order: (what, marker)
/// — the initramfs's and the agent's own lines.
pub const CONSOLE_MARKS: &[(&str, &str)] = &[
    (
        "kernel + initramfs: rootfs verified",
        "tether-initramfs: rootfs verified",
    ),
    ("systemd: agent started", "tether-agent started"),
    ("claimed: install begins", "node step=Marker"),
    ("runtime downloaded and checked", "node step=Configure"),
    ("containerd and kubelet running", "node step=Certificate"),
    ("client certificate issued", "node step=Network"),
    ("Node registered, podCIDR, CNI written", "node step=Ready"),
];

/// Applies WorkerPool `name` (namespace `default`) of `tenant` with `replicas` (and the
/// kubelet `version`, else the tenant's), selecting exactly the Machines booted with `macs`
/// (the tests share the site's inventory).
pub fn apply_pool(
    site: &Site,
    tenant: &str,
    name: &str,
    replicas: u32,
    version: Option<&str>,
    macs: &[&str],
) {
    let file = site.dir.join(format!("{name}.wp.yaml"));
    std::fs::write(
        &file,
        worker_pool_yaml(tenant, name, replicas, version, Some(macs), "{tier: test}"),
    )
    .unwrap();
    site.kubectl(&["apply", "-f", &file.display().to_string()])
        .unwrap();
}

/// WorkerPool `name` (namespace `default`) of `tenant` with `replicas`, the kubelet
/// `version` (else the tenant's), `labels` (a YAML map) on its nodes, selecting the Machines
/// booted with `macs`, or any Machine with `None`.
pub fn worker_pool_yaml(
    tenant: &str,
    name: &str,
    replicas: u32,
    version: Option<&str>,
    macs: Option<&[&str]>,
    labels: &str,
) -> String {
    let selector = match macs {
        None => "  machineSelector: {}\n".to_string(),
        Some(macs) => {
            let values: Vec<String> = macs
                .iter()
                .map(|m| m.parse::<tether_boot::Mac>().unwrap().dashed())
                .collect();
            format!(
                "  machineSelector:\n    matchExpressions:\n\
                 \x20   - {{key: {}, operator: In, values: [{}]}}\n",
                tether_api::machine::MAC_LABEL,
                values.join(", ")
            )
        }
    };
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkerPool\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  controlPlaneRef: {{name: {tenant}}}\n  replicas: {replicas}\n\
         \x20 labels: {labels}\n{}{selector}",
        version
            .map(|v| format!("  kubernetesVersion: {v}\n"))
            .unwrap_or_default(),
    )
}

/// The Machine name of a machine that enrolled with `mac` (its MAC decides it).
pub fn machine_of(mac: &str) -> String {
    mac.parse::<tether_boot::Mac>().unwrap().machine_name()
}

/// Pushes the container images and node artifacts of the pins to the site's store, once
/// per run; the store's address.
pub async fn fill_store(site: &'static Site) -> String {
    static FILLED: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    FILLED
        .get_or_init(|| async move {
            tokio::task::spawn_blocking(move || push_store(site))
                .await
                .unwrap()
                .expect("fill the artifact store")
        })
        .await
        .clone()
}

/// Builds (cached by version) and pushes the pinned container images and node artifacts to
/// the site's artifact store; the store's address.
pub fn push_store(site: &Site) -> Result<String, String> {
    let store =
        tether_testkit::published::artifact_store(&site.kubeconfig).map_err(|e| e.to_string())?;
    let work = site.dir.join("containers");
    tether_image::containers::push_all(&store, &Pins::default(), &work)
        .map_err(|e| format!("build and push the container images: {e}"))?;
    tether_image::node_artifacts::push_all(&store, &Pins::default(), &work)
        .map_err(|e| format!("push the node artifacts: {e}"))?;
    Ok(store)
}

/// One GET the artifact store served, from its access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreGet {
    /// The request path.
    pub path: String,
    /// The HTTP status.
    pub status: u16,
    /// Bytes sent.
    pub bytes: u64,
}

/// Every GET the site's store served to `ip`, in order. Access-log lines read
/// `<client> - - [time] "GET <path> HTTP/1.1" <status> <bytes> …`.
pub fn store_gets(site: &Site, ip: &str) -> Vec<StoreGet> {
    let log = std::fs::read_to_string(
        site.dir
            .join("standalone/management/tenants/registry/logs/registry.log"),
    )
    .unwrap();
    let client = format!("{} ", ip.trim());
    log.lines()
        .filter(|l| l.starts_with(&client))
        .filter_map(|l| {
            let (_, req) = l.split_once("\"GET ")?;
            let path = req.split_whitespace().next()?.to_string();
            let mut after = req.split('"').nth(1)?.split_whitespace();
            Some(StoreGet {
                path,
                status: after.next()?.parse().ok()?,
                bytes: after.next().and_then(|b| b.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

impl Tenant {
    /// Node `name`'s InternalIP.
    pub fn node_ip(&self, name: &str) -> String {
        self.kubectl(&[
            "get",
            "node",
            name,
            "-o",
            r#"jsonpath={.status.addresses[?(@.type=="InternalIP")].address}"#,
        ])
        .unwrap()
        .trim()
        .to_string()
    }
}

/// Waits until Machine `name` satisfies `ok` (the last state on timeout).
pub async fn wait_machine(
    client: &kube::Client,
    name: &str,
    timeout: Duration,
    ok: impl Fn(&tether_api::Machine) -> bool,
) -> Result<(), String> {
    let api: kube::Api<tether_api::Machine> = kube::Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let m = api.get_opt(name).await;
        if let Ok(Some(m)) = &m
            && ok(m)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "Machine {name} after {timeout:?}: {:?}",
                m.map(|m| m.map(|m| (m.spec, m.status)))
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether Machine `m` has condition `type_` with status `status`.
pub fn has_condition(m: &tether_api::Machine, type_: &str, status: &str) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == status)
    })
}
