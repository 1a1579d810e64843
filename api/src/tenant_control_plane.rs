//! `TenantControlPlane`: one tenant's Kubernetes control plane, hosted by the operator.
//!
//! Shaped like Kamaji's resource of the same name (`spec.kubernetes.version`,
//! `spec.controlPlane.service`, `spec.networkProfile`, `spec.dataStore`, `spec.addons`) so
//! its users feel at home. [`validate`] holds every check that needs no cluster access; the
//! CRD carries the OpenAPI bounds and the CEL rules that the API server can enforce itself.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The desired control plane of one tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "tether.dev",
        version = "v1alpha1",
        kind = "TenantControlPlane",
        shortname = "tcp",
        namespaced,
        status = "TenantControlPlaneStatus",
        printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
        printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#,
        printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
        validation = kube::core::Rule::new("!has(self.spec.controlPlane) || !has(self.spec.controlPlane.service) || !has(self.spec.controlPlane.service.nodePort) || self.spec.controlPlane.service.type == 'NodePort'").message("spec.controlPlane.service.nodePort is only allowed with type NodePort"),
        validation = kube::core::Rule::new("!has(self.spec.dataStore) || !has(oldSelf.spec.dataStore) || self.spec.dataStore == oldSelf.spec.dataStore").message("spec.dataStore cannot be changed: tenant data is not migrated between datastores")
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantControlPlaneSpec {
    /// Which Kubernetes to run.
    pub kubernetes: KubernetesSpec,
    /// Replicas and how the API is exposed.
    #[serde(default)]
    pub control_plane: ControlPlaneSpec,
    /// The tenant cluster's networks.
    #[serde(default)]
    pub network_profile: NetworkProfile,
    /// Name of the (cluster-scoped) `DataStore` that keeps this tenant's state; unset means
    /// the operator's default DataStore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_store: Option<String>,
    /// Tenant add-ons the operator installs once the API answers.
    #[serde(default)]
    pub addons: Addons,
    /// kube-apiserver tuning.
    #[serde(default)]
    pub api_server: ApiServerSpec,
}

/// The Kubernetes release of the tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesSpec {
    /// `vMAJOR.MINOR.PATCH`; must be one the operator has binaries/images for. Raising it by
    /// one minor upgrades the control plane; skipping a minor or going down is refused.
    #[schemars(regex(pattern = r"^v[0-9]+\.[0-9]+\.[0-9]+$"))]
    pub version: String,
}

/// How many API servers run and how they are reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneSpec {
    /// API server replicas (the `kubernetes` runtime's Deployment replicas; the `process`
    /// runtime runs one).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,
    /// The Service (or, on the process runtime, the listener) that exposes the API.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Resource requests/limits per component (`kube-apiserver`, …), as Kubernetes
    /// quantities (`cpu`, `memory`); only the `kubernetes` runtime applies them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, ComponentResources>,
}

impl Default for ControlPlaneSpec {
    fn default() -> Self {
        ControlPlaneSpec {
            replicas: 1,
            service: ServiceSpec::default(),
            resources: BTreeMap::new(),
        }
    }
}

fn one() -> i32 {
    1
}

/// Requests and limits of one component container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComponentResources {
    /// Requested quantities, e.g. `{"cpu": "100m", "memory": "256Mi"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Limits, same shape.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// How the tenant API is exposed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Kubernetes Service type on the `kubernetes` runtime.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// The API port clients use.
    #[serde(default = "default_api_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Fixed node port (type NodePort only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<u16>,
    /// The address clients and nodes reach the API at (goes into the serving certificate,
    /// kubeconfigs and `cluster-info`). Unset: the Service's address, or `127.0.0.1` on the
    /// process runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            type_: ServiceType::ClusterIP,
            port: default_api_port(),
            node_port: None,
            address: None,
        }
    }
}

fn default_api_port() -> u16 {
    6443
}

/// Kubernetes Service types the API may be exposed with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the management cluster only.
    #[default]
    ClusterIP,
    /// Reachable on every management node's port.
    NodePort,
    /// A load balancer address.
    LoadBalancer,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        })
    }
}

/// The tenant cluster's networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkProfile {
    /// Cluster IP range of Services (`--service-cluster-ip-range`).
    #[serde(default = "default_service_cidr", rename = "serviceCIDR")]
    pub service_cidr: String,
    /// Pod range (`--cluster-cidr` of the controller-manager).
    #[serde(default = "default_pod_cidr", rename = "podCIDR")]
    pub pod_cidr: String,
    /// CoreDNS Service address; unset means the tenth address of `serviceCIDR`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "dnsServiceIP"
    )]
    pub dns_service_ip: Option<String>,
    /// Cluster DNS domain.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Extra names and addresses for the API serving certificate.
    #[serde(default, rename = "certSANs", skip_serializing_if = "Vec::is_empty")]
    pub cert_sans: Vec<String>,
}

impl Default for NetworkProfile {
    fn default() -> Self {
        NetworkProfile {
            service_cidr: default_service_cidr(),
            pod_cidr: default_pod_cidr(),
            dns_service_ip: None,
            cluster_domain: default_cluster_domain(),
            cert_sans: Vec::new(),
        }
    }
}

fn default_service_cidr() -> String {
    "10.96.0.0/16".into()
}
fn default_pod_cidr() -> String {
    "10.244.0.0/16".into()
}
fn default_cluster_domain() -> String {
    "cluster.local".into()
}

/// Tenant add-ons. An absent add-on is not installed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Addons {
    /// CoreDNS in the tenant's kube-system.
    #[serde(default, rename = "coreDNS", skip_serializing_if = "Option::is_none")]
    pub core_dns: Option<AddonSpec>,
    /// kube-proxy DaemonSet in the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_proxy: Option<AddonSpec>,
    /// konnectivity-server next to the API server, so the API reaches nodes through the
    /// agents' tunnels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub konnectivity: Option<KonnectivitySpec>,
}

impl Default for Addons {
    fn default() -> Self {
        Addons {
            core_dns: Some(AddonSpec::default()),
            kube_proxy: Some(AddonSpec::default()),
            konnectivity: Some(KonnectivitySpec::default()),
        }
    }
}

/// An add-on with an optional image override.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddonSpec {
    /// Image override; unset means the upstream image matching the Kubernetes version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// konnectivity-server settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KonnectivitySpec {
    /// Port the agents dial (`--agent-port`).
    #[serde(default = "default_konnectivity_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

impl Default for KonnectivitySpec {
    fn default() -> Self {
        KonnectivitySpec {
            port: default_konnectivity_port(),
        }
    }
}

fn default_konnectivity_port() -> u16 {
    8132
}

/// kube-apiserver tuning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiServerSpec {
    /// Extra `--flag=value` arguments. Flags the operator owns (certificates, etcd, ports,
    /// service range) are refused so a typo cannot cut the control plane off its PKI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

/// Where a tenant control plane is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TenantControlPlanePhase {
    /// Being created: PKI, datastore, components.
    #[default]
    Provisioning,
    /// The API answers `/readyz` and the tenant is bootstrapped.
    Ready,
    /// Components are moving to a new version.
    Upgrading,
    /// Was ready, is not now (or the spec is refused); see conditions.
    NotReady,
    /// Being torn down.
    Deleting,
}

impl fmt::Display for TenantControlPlanePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// What the operator last observed of a tenant control plane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantControlPlaneStatus {
    /// Current phase.
    #[serde(default)]
    pub phase: TenantControlPlanePhase,
    /// `DataStoreReady`, `CertificatesReady`, `ControlPlaneAvailable`, `TenantBootstrapped`,
    /// `SpecValid`, ….
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The Kubernetes version the components run now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `https://host:port` of the tenant API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `host:port` where nodes' konnectivity agents connect (gRPC over TLS), on the same
    /// address as the API; absent without the konnectivity add-on, or where the cluster
    /// assigns the port (a NodePort Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub konnectivity_endpoint: Option<String>,
    /// `sha256:<hex>` of the cluster CA's SubjectPublicKeyInfo, as `kubeadm join
    /// --discovery-token-ca-cert-hash` expects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_hash: Option<String>,
    /// Secret (same namespace) with the admin kubeconfig under `admin.conf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret: Option<String>,
    /// The DataStore the tenant's data lives in (fixed at creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_store: Option<String>,
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The CA rotation last requested with the `tether.dev/rotate-ca` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_rotation: Option<CaRotationStatus>,
}

/// Progress of a CA rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaRotationStatus {
    /// The value of the `tether.dev/rotate-ca` annotation this rotation is for.
    pub id: String,
    /// `Trusting` (both CAs trusted, new kubeconfigs issued, old ones still work) or
    /// `Completed` (set `tether.dev/rotate-ca-complete` to the same id: only the new CA).
    pub phase: String,
}

/// Annotation that starts a CA rotation; its value names the rotation.
pub const ROTATE_CA_ANNOTATION: &str = "tether.dev/rotate-ca";
/// Annotation that completes the rotation whose id it holds.
pub const ROTATE_CA_COMPLETE_ANNOTATION: &str = "tether.dev/rotate-ca-complete";

/// A standard Kubernetes condition (the shape of `metav1.Condition`), defined here so the
/// types need no k8s-openapi without the `kube` feature.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `DataStoreReady`, `CertificatesReady`, ….
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase machine-readable reason.
    pub reason: String,
    /// What a human should know.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A field of a spec that failed validation, with a reason a human can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// JSON path of the field, e.g. `spec.networkProfile.podCIDR`.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// An IPv4 or IPv6 network `addr/prefix` with the host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::/n`; refuses set host bits so a typo such as
    /// `10.96.0.1/12` is caught rather than silently widened.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (want ADDRESS/PREFIX)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {prefix:?} is not in 0..={max}"))?;
        let cidr = Cidr { addr, prefix };
        if cidr.bits() & !cidr.mask() != 0 {
            return Err(format!(
                "{s} has host bits set (did you mean {}?)",
                Cidr {
                    addr: cidr.addr_of(cidr.bits() & cidr.mask()),
                    prefix
                }
            ));
        }
        Ok(cidr)
    }

    fn width(&self) -> u32 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn addr_of(&self, bits: u128) -> IpAddr {
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4((bits as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(bits.into()),
        }
    }

    fn mask(&self) -> u128 {
        let width = self.width();
        let all: u128 = if width == 32 {
            u32::MAX as u128
        } else {
            u128::MAX
        };
        if self.prefix == 0 {
            0
        } else {
            all & !((1u128 << (width - self.prefix as u32)) - 1) & all
        }
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let other = Cidr {
            addr: ip,
            prefix: 0,
        };
        other.bits() & self.mask() == self.bits()
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let shorter = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        self.bits() & shorter.mask() == other.bits() & shorter.mask()
    }

    /// The `n`-th address of the network (`n = 1` is the API server's Service IP by
    /// Kubernetes convention, `n = 10` CoreDNS's); `None` past the end.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        let size_bits = self.width() - self.prefix as u32;
        if size_bits < 128 && n >= (1u128 << size_bits) {
            return None;
        }
        Some(self.addr_of(self.bits() + n))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A parsed `vMAJOR.MINOR.PATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    /// Major (1).
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl KubeVersion {
    /// Parses `v1.36.3` (the leading `v` is required, as in every Kubernetes release tag).
    pub fn parse(s: &str) -> Result<KubeVersion, String> {
        let rest = s
            .strip_prefix('v')
            .ok_or_else(|| format!("{s:?} must start with 'v' (like v1.36.3)"))?;
        let parts: Vec<&str> = rest.split('.').collect();
        let [major, minor, patch] = parts.as_slice() else {
            return Err(format!("{s:?} is not vMAJOR.MINOR.PATCH"));
        };
        let num = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| format!("{s:?} is not vMAJOR.MINOR.PATCH"))
        };
        Ok(KubeVersion {
            major: num(major)?,
            minor: num(minor)?,
            patch: num(patch)?,
        })
    }
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Whether moving from `current` to `desired` is allowed: same version, a patch change
/// within the minor, or exactly one minor up. Kubernetes supports nothing else for the
/// control plane (version skew policy), and a downgrade could corrupt stored objects.
pub fn check_upgrade(current: &KubeVersion, desired: &KubeVersion) -> Result<(), String> {
    if desired.major != current.major {
        return Err(format!(
            "changing the major version ({current} -> {desired}) is not supported"
        ));
    }
    if desired.minor < current.minor || (desired.minor == current.minor && desired < current) {
        return Err(format!(
            "downgrade {current} -> {desired} refused: control planes only move forward"
        ));
    }
    if desired.minor > current.minor + 1 {
        return Err(format!(
            "upgrade {current} -> {desired} skips a minor; go through v{}.{}.x first",
            current.major,
            current.minor + 1
        ));
    }
    Ok(())
}

/// kube-apiserver flags the operator sets itself; `extraArgs` may not override them.
pub const OWNED_APISERVER_FLAGS: &[&str] = &[
    "etcd-servers",
    "etcd-prefix",
    "etcd-cafile",
    "etcd-certfile",
    "etcd-keyfile",
    "tls-cert-file",
    "tls-private-key-file",
    "client-ca-file",
    "secure-port",
    "service-cluster-ip-range",
    "service-account-key-file",
    "service-account-signing-key-file",
    "kubelet-client-certificate",
    "kubelet-client-key",
    "requestheader-client-ca-file",
    "proxy-client-cert-file",
    "proxy-client-key-file",
    "egress-selector-config-file",
];

/// kube-apiserver flags that name files, sockets or other data stores on the machine the
/// component runs on. The operator ships no user files to components, so such a path could
/// only point at what the operator owns — on the process runtime, another tenant's
/// certificates or the DataStore's root credentials, readable or (audit log, debug socket)
/// writable by every tenant's API server. `extraArgs` may not set them.
pub const HOST_PATH_APISERVER_FLAGS: &[&str] = &[
    "admission-control-config-file",
    "audit-log-path",
    "audit-policy-file",
    "audit-webhook-config-file",
    "authentication-config",
    "authentication-token-webhook-config-file",
    "authorization-config",
    "authorization-policy-file",
    "authorization-webhook-config-file",
    "cert-dir",
    "debug-socket-path",
    "encryption-provider-config",
    "etcd-servers-overrides",
    "kubelet-certificate-authority",
    "oidc-ca-file",
    "peer-ca-file",
    "service-account-signing-endpoint",
    "tls-sni-cert-key",
    "token-auth-file",
    "tracing-config-file",
];

/// Every check on a spec that needs no cluster access. `known_versions` are the Kubernetes
/// versions the operator can run. Returns all problems at once so a user fixes them in one
/// round.
pub fn validate(spec: &TenantControlPlaneSpec, known_versions: &[&str]) -> Vec<Invalid> {
    let mut out = Vec::new();
    let mut bad = |field: &'static str, reason: String| out.push(Invalid { field, reason });

    match KubeVersion::parse(&spec.kubernetes.version) {
        Err(e) => bad("spec.kubernetes.version", e),
        Ok(_) if !known_versions.contains(&spec.kubernetes.version.as_str()) => bad(
            "spec.kubernetes.version",
            format!(
                "{} is not a version this operator can run (known: {})",
                spec.kubernetes.version,
                known_versions.join(", ")
            ),
        ),
        Ok(_) => {}
    }

    let cp = &spec.control_plane;
    if !(1..=9).contains(&cp.replicas) {
        bad(
            "spec.controlPlane.replicas",
            format!("{} is not in 1..=9", cp.replicas),
        );
    }
    if cp.service.port == 0 {
        bad(
            "spec.controlPlane.service.port",
            "port 0 is not valid".into(),
        );
    }
    match (cp.service.type_, cp.service.node_port) {
        (ServiceType::NodePort, Some(p)) if !(30000..=32767).contains(&p) => bad(
            "spec.controlPlane.service.nodePort",
            format!("{p} is outside the node port range 30000-32767"),
        ),
        (ServiceType::NodePort, _) | (_, None) => {}
        (t, Some(_)) => bad(
            "spec.controlPlane.service.nodePort",
            format!("nodePort is only allowed with type NodePort, not {t}"),
        ),
    }
    if let Some(addr) = &cp.service.address
        && !valid_host(addr)
    {
        bad(
            "spec.controlPlane.service.address",
            format!("{addr:?} is neither an IP address nor a DNS name"),
        );
    }
    if let Some(k) = &spec.addons.konnectivity {
        if k.port == 0 {
            bad(
                "spec.addons.konnectivity.port",
                "port 0 is not valid".into(),
            );
        } else if k.port == cp.service.port {
            bad(
                "spec.addons.konnectivity.port",
                format!(
                    "{} clashes with the API port controlPlane.service.port",
                    k.port
                ),
            );
        }
    }

    let np = &spec.network_profile;
    let service = Cidr::parse(&np.service_cidr)
        .map_err(|e| bad("spec.networkProfile.serviceCIDR", e))
        .ok();
    let pod = Cidr::parse(&np.pod_cidr)
        .map_err(|e| bad("spec.networkProfile.podCIDR", e))
        .ok();
    if let (Some(s), Some(p)) = (&service, &pod)
        && s.overlaps(p)
    {
        bad(
            "spec.networkProfile.podCIDR",
            format!("{p} overlaps serviceCIDR {s}"),
        );
    }
    if let Some(s) = &service {
        // The apiserver refuses service ranges with more than 2^20 addresses.
        let host_bits = s.width() - s.prefix as u32;
        if host_bits > 20 {
            bad(
                "spec.networkProfile.serviceCIDR",
                format!("{s} is larger than the API server allows (at most /12 for IPv4)"),
            );
        } else if host_bits < 4 {
            bad(
                "spec.networkProfile.serviceCIDR",
                format!("{s} is too small (needs room for the API and DNS service IPs)"),
            );
        }
    }
    if let Some(dns) = &np.dns_service_ip {
        match dns.parse::<IpAddr>() {
            Err(_) => bad(
                "spec.networkProfile.dnsServiceIP",
                format!("{dns:?} is not an IP address"),
            ),
            Ok(ip) => {
                if let Some(s) = &service {
                    if !s.contains(ip) {
                        bad(
                            "spec.networkProfile.dnsServiceIP",
                            format!("{ip} is not inside serviceCIDR {s}"),
                        );
                    } else if Some(ip) == s.nth(0) || Some(ip) == s.nth(1) {
                        bad(
                            "spec.networkProfile.dnsServiceIP",
                            format!("{ip} is the network address or the API server's service IP"),
                        );
                    }
                }
            }
        }
    }
    if !valid_dns_name(&np.cluster_domain) {
        bad(
            "spec.networkProfile.clusterDomain",
            format!("{:?} is not a DNS name", np.cluster_domain),
        );
    }
    for san in &np.cert_sans {
        if !valid_host(san) {
            bad(
                "spec.networkProfile.certSANs",
                format!("{san:?} is neither an IP address nor a DNS name"),
            );
        }
    }

    for arg in &spec.api_server.extra_args {
        let Some(flag) = arg.strip_prefix("--") else {
            bad(
                "spec.apiServer.extraArgs",
                format!("{arg:?} must look like --flag=value"),
            );
            continue;
        };
        let name = flag.split('=').next().unwrap_or_default();
        if name.is_empty() {
            bad(
                "spec.apiServer.extraArgs",
                format!("{arg:?} has no flag name"),
            );
        } else if OWNED_APISERVER_FLAGS.contains(&name) {
            bad(
                "spec.apiServer.extraArgs",
                format!("--{name} is set by the operator and cannot be overridden"),
            );
        } else if HOST_PATH_APISERVER_FLAGS.contains(&name) {
            bad(
                "spec.apiServer.extraArgs",
                format!(
                    "--{name} names a path on the operator's machine, which a tenant may not choose"
                ),
            );
        }
    }
    out
}

/// An IP address or a DNS name (wildcards allowed as the first label, as in SANs).
fn valid_host(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || valid_dns_name(s.strip_prefix("*.").unwrap_or(s))
}

fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["v1.35.4", "v1.36.3"];

    fn spec() -> TenantControlPlaneSpec {
        TenantControlPlaneSpec {
            kubernetes: KubernetesSpec {
                version: "v1.36.3".into(),
            },
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(validate(&spec(), KNOWN), vec![]);
    }

    #[test]
    fn defaults_fill_from_minimal_yaml() {
        let s: TenantControlPlaneSpec =
            serde_json::from_str(r#"{"kubernetes":{"version":"v1.36.3"}}"#).unwrap();
        assert_eq!(s.control_plane.replicas, 1);
        assert_eq!(s.control_plane.service.port, 6443);
        assert_eq!(s.network_profile.service_cidr, "10.96.0.0/16");
        assert_eq!(s.addons.konnectivity.as_ref().unwrap().port, 8132);
        assert_eq!(validate(&s, KNOWN), vec![]);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        type Edit = fn(&mut TenantControlPlaneSpec);
        let table: &[(&str, Edit, &str, &str)] = &[
            (
                "unknown version",
                |s| s.kubernetes.version = "v1.99.0".into(),
                "spec.kubernetes.version",
                "not a version this operator can run",
            ),
            (
                "unparseable version",
                |s| s.kubernetes.version = "1.36".into(),
                "spec.kubernetes.version",
                "must start with 'v'",
            ),
            (
                "two-part version",
                |s| s.kubernetes.version = "v1.36".into(),
                "spec.kubernetes.version",
                "vMAJOR.MINOR.PATCH",
            ),
            (
                "bad service cidr",
                |s| s.network_profile.service_cidr = "10.96.0.0".into(),
                "spec.networkProfile.serviceCIDR",
                "not a CIDR",
            ),
            (
                "host bits",
                |s| s.network_profile.service_cidr = "10.96.0.1/16".into(),
                "spec.networkProfile.serviceCIDR",
                "did you mean 10.96.0.0/16",
            ),
            (
                "prefix too long",
                |s| s.network_profile.pod_cidr = "10.0.0.0/33".into(),
                "spec.networkProfile.podCIDR",
                "not in 0..=32",
            ),
            (
                "overlap",
                |s| s.network_profile.pod_cidr = "10.96.128.0/17".into(),
                "spec.networkProfile.podCIDR",
                "overlaps serviceCIDR",
            ),
            (
                "overlap, pod wider",
                |s| s.network_profile.pod_cidr = "10.0.0.0/8".into(),
                "spec.networkProfile.podCIDR",
                "overlaps",
            ),
            (
                "service range too big",
                |s| s.network_profile.service_cidr = "10.0.0.0/8".into(),
                "spec.networkProfile.serviceCIDR",
                "larger than",
            ),
            (
                "dns outside",
                |s| s.network_profile.dns_service_ip = Some("10.97.0.10".into()),
                "spec.networkProfile.dnsServiceIP",
                "not inside serviceCIDR",
            ),
            (
                "dns is api ip",
                |s| s.network_profile.dns_service_ip = Some("10.96.0.1".into()),
                "spec.networkProfile.dnsServiceIP",
                "API server's service IP",
            ),
            (
                "dns not ip",
                |s| s.network_profile.dns_service_ip = Some("dns".into()),
                "spec.networkProfile.dnsServiceIP",
                "not an IP",
            ),
            (
                "bad domain",
                |s| s.network_profile.cluster_domain = "-x.local".into(),
                "spec.networkProfile.clusterDomain",
                "not a DNS name",
            ),
            (
                "bad san",
                |s| s.network_profile.cert_sans = vec!["a b".into()],
                "spec.networkProfile.certSANs",
                "neither",
            ),
            (
                "port 0",
                |s| s.control_plane.service.port = 0,
                "spec.controlPlane.service.port",
                "port 0",
            ),
            (
                "konnectivity clash",
                |s| s.addons.konnectivity = Some(KonnectivitySpec { port: 6443 }),
                "spec.addons.konnectivity.port",
                "clashes",
            ),
            (
                "nodePort on ClusterIP",
                |s| s.control_plane.service.node_port = Some(30001),
                "spec.controlPlane.service.nodePort",
                "only allowed with type NodePort",
            ),
            (
                "nodePort out of range",
                |s| {
                    s.control_plane.service.type_ = ServiceType::NodePort;
                    s.control_plane.service.node_port = Some(8080)
                },
                "spec.controlPlane.service.nodePort",
                "outside the node port range",
            ),
            (
                "replicas 0",
                |s| s.control_plane.replicas = 0,
                "spec.controlPlane.replicas",
                "not in 1..=9",
            ),
            (
                "bad address",
                |s| s.control_plane.service.address = Some("http://x".into()),
                "spec.controlPlane.service.address",
                "neither",
            ),
            (
                "owned flag",
                |s| s.api_server.extra_args = vec!["--etcd-servers=http://evil".into()],
                "spec.apiServer.extraArgs",
                "set by the operator",
            ),
            (
                "host path flag",
                |s| {
                    s.api_server.extra_args =
                        vec!["--audit-log-path=../default.beta/pki/ca.crt".into()]
                },
                "spec.apiServer.extraArgs",
                "names a path",
            ),
            (
                "host path flag without value",
                |s| s.api_server.extra_args = vec!["--token-auth-file".into()],
                "spec.apiServer.extraArgs",
                "names a path",
            ),
            (
                "not a flag",
                |s| s.api_server.extra_args = vec!["v=4".into()],
                "spec.apiServer.extraArgs",
                "--flag=value",
            ),
        ];
        for (name, edit, field, reason) in table {
            let mut s = spec();
            edit(&mut s);
            let errs = validate(&s, KNOWN);
            assert!(
                errs.iter()
                    .any(|e| e.field == *field && e.reason.contains(reason)),
                "{name}: got {errs:?}"
            );
        }
    }

    #[test]
    fn accepted_variants() {
        type Edit = fn(&mut TenantControlPlaneSpec);
        let table: &[(&str, Edit)] = &[
            ("ipv6 ranges", |s| {
                s.network_profile.service_cidr = "fd00:10:96::/112".into();
                s.network_profile.pod_cidr = "fd00:10:244::/56".into();
            }),
            ("nodeport", |s| {
                s.control_plane.service.type_ = ServiceType::NodePort;
                s.control_plane.service.node_port = Some(31443);
            }),
            ("dns ip", |s| {
                s.network_profile.dns_service_ip = Some("10.96.0.10".into())
            }),
            ("sans", |s| {
                s.network_profile.cert_sans = vec![
                    "api.example.com".into(),
                    "*.example.com".into(),
                    "192.0.2.7".into(),
                ]
            }),
            ("extra args", |s| {
                s.api_server.extra_args = vec!["--v=2".into(), "--audit-log-maxage=3".into()]
            }),
            ("no konnectivity", |s| s.addons.konnectivity = None),
            ("previous minor", |s| {
                s.kubernetes.version = "v1.35.4".into()
            }),
        ];
        for (name, edit) in table {
            let mut s = spec();
            edit(&mut s);
            assert_eq!(validate(&s, KNOWN), vec![], "{name}");
        }
    }

    #[test]
    fn cidr_math() {
        let c = Cidr::parse("10.96.0.0/12").unwrap();
        assert!(c.contains("10.111.255.255".parse().unwrap()));
        assert!(!c.contains("10.112.0.0".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert_eq!(c.nth(1).unwrap().to_string(), "10.96.0.1");
        assert_eq!(c.nth(10).unwrap().to_string(), "10.96.0.10");
        assert_eq!(Cidr::parse("10.0.0.0/30").unwrap().nth(4), None);
        assert!(Cidr::parse("0.0.0.0/0").unwrap().overlaps(&c));
        assert!(!Cidr::parse("10.95.0.0/16").unwrap().overlaps(&c));
        let v6 = Cidr::parse("fd00::/108").unwrap();
        assert_eq!(v6.nth(1).unwrap().to_string(), "fd00::1");
        assert!(Cidr::parse("fd00::1/64").is_err());
    }

    #[test]
    fn upgrade_rules() {
        let v = |s| KubeVersion::parse(s).unwrap();
        let table = [
            ("v1.35.4", "v1.35.4", Ok(())),
            ("v1.35.4", "v1.35.9", Ok(())),
            ("v1.35.4", "v1.36.3", Ok(())),
            ("v1.35.4", "v1.37.0", Err("skips a minor")),
            ("v1.36.3", "v1.35.4", Err("downgrade")),
            ("v1.36.3", "v1.36.1", Err("downgrade")),
            ("v1.36.3", "v2.0.0", Err("major")),
        ];
        for (from, to, want) in table {
            let got = check_upgrade(&v(from), &v(to));
            match (want, got) {
                (Ok(()), Ok(())) => {}
                (Err(needle), Err(msg)) => assert!(msg.contains(needle), "{from}->{to}: {msg}"),
                (w, g) => panic!("{from}->{to}: want {w:?} got {g:?}"),
            }
        }
    }
}
