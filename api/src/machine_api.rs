//! The agent ↔ operator machine API: HTTPS JSON, mutually authenticated after enrollment.
//!
//! | method and path | who | body → answer |
//! |---|---|---|
//! | `POST /v1/enroll` | anyone with a token (server TLS only, pinned by the agent) | [`EnrollRequest`] → [`EnrollResponse`] |
//! | `GET /v1/machines/{name}/config?version=V&timeout=S` | that machine's certificate | long-poll → [`DesiredConfig`] (as soon as its version differs from V, else the current one after S seconds) |
//! | `POST /v1/machines/{name}/status` | that machine's certificate | [`StatusReport`] → [`StatusAck`] |
//! | `POST /v1/machines/{name}/renew` | that machine's certificate | [`RenewRequest`] → [`EnrollResponse`] |
//!
//! Every refusal is an HTTP status plus an [`ApiError`] body whose [`Reason`] a program can
//! match on and whose message a person can act on. Where the API is found is published in
//! the ConfigMap [`NAMESPACE`]/[`CONFIG_MAP`] (keys [`KEY_URL`], [`KEY_CA_PIN`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::machine::{Facts, MachinePhase};
use crate::tenant_control_plane::Condition;

/// The operator's namespace: the machine API's CA, its ConfigMap and every token live here.
pub const NAMESPACE: &str = "tether-system";
/// The ConfigMap publishing the machine API.
pub const CONFIG_MAP: &str = "tether-machine-api";
/// ConfigMap key: the base URL nodes use.
pub const KEY_URL: &str = "url";
/// ConfigMap key: `sha256:<hex>` of the CA's public key.
pub const KEY_CA_PIN: &str = "caPin";
/// The Secret holding the machine API CA (type `kubernetes.io/tls`: `tls.crt`, `tls.key`).
pub const CA_SECRET: &str = "tether-machine-api-ca";
/// Common-name prefix of machine certificates: `tether:machine:<name>`.
pub const MACHINE_CN_PREFIX: &str = "tether:machine:";

/// `POST` path of enrollment.
pub const ENROLL_PATH: &str = "/v1/enroll";

/// `/v1/machines/{name}/config`
pub fn config_path(machine: &str) -> String {
    format!("/v1/machines/{machine}/config")
}

/// `/v1/machines/{name}/status`
pub fn status_path(machine: &str) -> String {
    format!("/v1/machines/{machine}/status")
}

/// `/v1/machines/{name}/renew`
pub fn renew_path(machine: &str) -> String {
    format!("/v1/machines/{machine}/renew")
}

/// A token and a CSR in exchange for a machine certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollRequest {
    /// `<id>.<secret>`. Sent as text so a malformed one gets its own clear refusal.
    pub token: String,
    /// PKCS#10 CSR (PEM) for the key the node generated and keeps.
    pub csr: String,
    /// What the machine is.
    pub facts: Facts,
}

/// A machine certificate and who it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    /// The Machine this node is.
    pub machine: String,
    /// The certificate (PEM), CN `tether:machine:<machine>`.
    pub certificate: String,
    /// The machine API CA (PEM): what the node trusts from now on.
    pub ca: String,
}

/// A new CSR for a new certificate (renewal at two thirds of the old one's life).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 CSR (PEM).
    pub csr: String,
}

/// What the operator wants of a machine. Grows with the join issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredConfig {
    /// A digest of everything below ([`DesiredConfig::digest`]): it changes exactly when
    /// anything else changes. The next long-poll passes it as `version`.
    pub version: String,
    /// The Machine.
    pub machine: String,
    /// Its phase as the operator sees it.
    pub phase: MachinePhase,
    /// The claiming WorkerPool (`namespace/name`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The BootImage it should run, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How often the agent reports (seconds): the operator marks it unreachable after
    /// three missed reports.
    pub report_seconds: u32,
    /// What the machine joins, while a pool holds it; absent, the node keeps nothing of any
    /// tenant (a released machine wipes what it had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<Join>,
}

/// Everything a claimed machine needs to become a Node of its pool's tenant. Rendered by
/// the pool controller for this one Machine and served only to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Join {
    /// The tenant, `<namespace>/<name>`.
    pub tenant: String,
    /// The tenant API, `https://host:port`.
    pub api_server: String,
    /// The tenant cluster CA bundle (PEM).
    pub ca: String,
    /// The tunnel the API server reaches this node through, when the tenant runs
    /// konnectivity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Tunnel>,
    /// `<id>.<secret>`, minted in the tenant for this Machine and this join (≤ 1 h); absent
    /// once the kubelet holds its client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<String>,
    /// The kubelet's version.
    pub kubernetes_version: String,
    /// The Node's name (the Machine's).
    pub node_name: String,
    /// The kubelet's `--node-ip`: the address the machine API sees the machine at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<String>,
    /// The runtime binaries, by digest from the artifact store.
    pub artifacts: Vec<NodeArtifact>,
    /// Kubelet settings.
    pub kubelet: KubeletSettings,
    /// containerd settings.
    pub containerd: ContainerdSettings,
    /// Routes to the other Nodes' pod CIDRs through their node IPs (host-gw).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<PodRoute>,
    /// NTP servers, when the site gives them here rather than by DHCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ntp: Vec<String>,
    /// DNS servers, when the site gives them here rather than by DHCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// The node's konnectivity tunnel: where to connect, with what, and what the API server may
/// dial through it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tunnel {
    /// konnectivity-server's agent endpoint, `host:port` (TLS, certificate from the
    /// tenant CA in [`Join::ca`]).
    pub server: String,
    /// A ServiceAccount token of the tenant's `kube-system/konnectivity-agent`, audience
    /// `system:konnectivity-server`, minted for this Machine and bound to a Secret the
    /// operator deletes when the machine leaves the tenant (after which the server refuses
    /// it at the next connect).
    pub token: String,
    /// When the token expires (RFC 3339); the operator mints the next one before.
    pub token_expires: String,
    /// The tenant's pod network: dials into it are allowed.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    /// The tenant's service network: dials into it are allowed.
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: String,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("token_expires", &self.token_expires)
            .field("pod_cidr", &self.pod_cidr)
            .field("service_cidr", &self.service_cidr)
            .finish()
    }
}

/// Where a node binary goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ArtifactKind {
    /// containerd, its shim, runc, the kubelet.
    #[default]
    Binary,
    /// A CNI plugin.
    CniPlugin,
}

/// One node binary to download, check and install.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeArtifact {
    /// File name (`kubelet`, `bridge`, …).
    pub name: String,
    /// Where it goes.
    pub kind: ArtifactKind,
    /// Its version.
    pub version: String,
    /// Download URL (the store's blob URL).
    pub url: String,
    /// Lower-case hex sha256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// What the kubelet is configured with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubeletSettings {
    /// The cluster DNS service IP.
    pub cluster_dns: String,
    /// The cluster domain.
    pub cluster_domain: String,
    /// Node labels (`--node-labels`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Taints registered with the Node, `key=value:Effect`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<String>,
    /// `tether://<machine>`.
    pub provider_id: String,
}

/// What containerd is configured with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerdSettings {
    /// The sandbox (pause) image.
    pub sandbox_image: String,
    /// Registries pulled through mirrors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

/// One registry mirrored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Mirror {
    /// The registry manifests name (`registry.k8s.io`).
    pub registry: String,
    /// `host:port` of the mirror (plain HTTP).
    pub endpoint: String,
}

/// A route to another Node's pods.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PodRoute {
    /// That Node's pod CIDR.
    pub cidr: String,
    /// That Node's IP on the shared segment.
    pub via: String,
}

impl DesiredConfig {
    /// The version of a config: hex sha256 (first 16 bytes) of its JSON without the
    /// version itself.
    pub fn digest(&self) -> String {
        use std::fmt::Write;
        let mut v = serde_json::to_value(self).expect("the desired config serializes");
        if let Some(o) = v.as_object_mut() {
            o.remove("version");
        }
        let bytes = serde_json::to_vec(&v).expect("a JSON value serializes");
        let hash = <sha2::Sha256 as sha2::Digest>::digest(&bytes);
        hash[..16].iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// `self` with its version set from its content.
    pub fn versioned(mut self) -> DesiredConfig {
        self.version = self.digest();
        self
    }
}

/// What the agent reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusReport {
    /// The phase the agent is in (Enrolled, Installing, …), if it has one to report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MachinePhase>,
    /// tether-agent version.
    pub agent_version: String,
    /// The image version running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
    /// A/B slot booted (disk installs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_slot: Option<String>,
    /// The agent's own conditions (`AgentReachable` is the operator's and is ignored here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The tenant (`<namespace>/<name>`) whose software or state is on the node; absent
    /// once a released node has wiped it (or before anything was installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The node joins and has no kubelet client certificate: it needs a bootstrap token.
    #[serde(default)]
    pub needs_bootstrap_token: bool,
}

/// The answer to a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusAck {
    /// The desired config's current version.
    pub version: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Reason {
    /// The body does not parse or a field is invalid.
    BadRequest,
    /// The body is larger than the API accepts.
    PayloadTooLarge,
    /// The token is not `<id>.<secret>`.
    TokenMalformed,
    /// No such token, or the secret does not match.
    TokenInvalid,
    /// The token expired.
    TokenExpired,
    /// The token has no uses left.
    TokenUsedUp,
    /// A boot token presented by a machine other than the one it was minted for.
    TokenWrongMac,
    /// The Machine this node would be is enrolled or in a pool already, and this token may
    /// not take it over (only its boot token, or a join token of its own pool, may).
    MachineClaimed,
    /// The endpoint needs a machine certificate.
    CertificateRequired,
    /// The certificate is valid but not for this Machine, or no longer on record.
    Forbidden,
    /// No such path.
    NotFound,
    /// Too many enrollments; retry later.
    RateLimited,
    /// The operator failed; retry later.
    Internal,
}

impl Reason {
    /// The HTTP status for this reason.
    pub fn http_status(self) -> u16 {
        match self {
            Reason::BadRequest => 400,
            Reason::PayloadTooLarge => 413,
            Reason::TokenMalformed
            | Reason::TokenInvalid
            | Reason::TokenExpired
            | Reason::TokenUsedUp
            | Reason::TokenWrongMac
            | Reason::MachineClaimed
            | Reason::Forbidden => 403,
            Reason::CertificateRequired => 401,
            Reason::NotFound => 404,
            Reason::RateLimited => 429,
            Reason::Internal => 500,
        }
    }

    /// Whether retrying the same request later can succeed.
    pub fn retriable(self) -> bool {
        matches!(self, Reason::RateLimited | Reason::Internal)
    }
}

/// The body of every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// What kind of refusal.
    pub reason: Reason,
    /// What a person should know.
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.reason, self.message)
    }
}

/// The machine API's URL and pin from its published ConfigMap: the one reader tether-pxe,
/// `token create --user-data` and the tests share. The URL is checked as the node will
/// check it.
#[cfg(feature = "kube")]
pub fn published(
    cm: &k8s_openapi::api::core::v1::ConfigMap,
) -> Result<(String, tether_boot::CaPin), String> {
    let data = cm.data.as_ref();
    let get = |k: &str| {
        data.and_then(|d| d.get(k))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("ConfigMap {CONFIG_MAP} has no {k}"))
    };
    let url = get(KEY_URL)?;
    tether_boot::cmdline::check_url("machine API URL", url)
        .map_err(|e| format!("ConfigMap {CONFIG_MAP} key {KEY_URL}: {e}"))?;
    let pin = get(KEY_CA_PIN)?
        .parse()
        .map_err(|e: tether_boot::Error| format!("ConfigMap {CONFIG_MAP} key {KEY_CA_PIN}: {e}"))?;
    Ok((url.clone(), pin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields() {
        let ok = r#"{"token":"a","csr":"b","facts":{}}"#;
        assert!(serde_json::from_str::<EnrollRequest>(ok).is_ok());
        let bad = r#"{"token":"a","csr":"b","facts":{},"admin":true}"#;
        assert!(serde_json::from_str::<EnrollRequest>(bad).is_err());
    }

    #[test]
    fn reasons_map_to_statuses() {
        let e = ApiError {
            reason: Reason::TokenExpired,
            message: "token abcdef expired".into(),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"reason":"TokenExpired","message":"token abcdef expired"}"#
        );
        assert_eq!(Reason::TokenExpired.http_status(), 403);
        assert_eq!(Reason::RateLimited.http_status(), 429);
        assert!(Reason::Internal.retriable() && !Reason::TokenUsedUp.retriable());
        assert_eq!(config_path("m1"), "/v1/machines/m1/config");
    }

    #[test]
    fn the_version_follows_the_content() {
        let c = DesiredConfig {
            version: String::new(),
            machine: "m".into(),
            phase: MachinePhase::Enrolled,
            pool: None,
            image: None,
            report_seconds: 15,
            join: None,
        }
        .versioned();
        assert_eq!(c.version.len(), 32);
        assert_eq!(c.clone().versioned().version, c.version, "stable");
        let assigned = DesiredConfig {
            phase: MachinePhase::Assigned,
            ..c.clone()
        }
        .versioned();
        assert_ne!(
            assigned.version, c.version,
            "a phase change is a new version"
        );
    }
}
