//! `Machine` (one physical or virtual server Tether knows of) and `BootImage` (an immutable
//! node image the PXE server can serve). Both are cluster-scoped: a site's machines are one
//! inventory that the pools of many tenants claim from (as PersistentVolumes are to claims),
//! and an image serves every tenant.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tenant_control_plane::Condition;

/// Label carrying a machine's boot MAC (`52-54-00-12-34-56`): labels are indexed by the API
/// server, `spec.macs` is not.
pub const MAC_LABEL: &str = "tether.dev/mac";
/// Label carrying a machine's SMBIOS UUID (lower case), the second way a re-enrolling
/// machine is found.
pub const UUID_LABEL: &str = "tether.dev/uuid";
/// The condition saying whether the agent reports on time.
pub const AGENT_REACHABLE: &str = "AgentReachable";
/// The condition the agent sets on a failed install or join (reason and message say why).
pub const NODE_INSTALLED: &str = "NodeInstalled";
/// The condition the agent sets on a joined node's konnectivity tunnel: True while it holds
/// a stream to every konnectivity-server instance (message `n/n servers`), False with the
/// reason otherwise. Without it the API server cannot reach the node (logs, exec, webhooks).
pub const TUNNEL_CONNECTED: &str = "TunnelConnected";
/// The provider ID of a Machine's Node: `tether://<machine>`.
pub fn provider_id(machine: &str) -> String {
    format!("tether://{machine}")
}

/// Of the Machines labelled with one MAC (normally one; a user may have made another), the
/// one a MAC belongs to: the first by name. tether-pxe and the machine API both decide by
/// this rule, so they never disagree about which Machine a MAC is.
pub fn owner_of_mac(names: impl IntoIterator<Item = String>) -> Option<String> {
    names.into_iter().min()
}

/// What a machine is and what it should run. Created by PXE discovery, agent enrollment or
/// a user; claimed by a worker pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "tether.dev",
        version = "v1alpha1",
        kind = "Machine",
        shortname = "mach",
        status = "MachineStatus",
        printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
        printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
        printcolumn = r#"{"name":"Last Seen","type":"date","jsonPath":".status.lastSeen"}"#,
        printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// MAC addresses of the machine's NICs, lower-case and colon-separated.
    #[serde(default)]
    pub macs: Vec<String>,
    /// SMBIOS/DMI system UUID, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Labels that worker pools select machines by (copied from facts or set by users).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The worker pool that has claimed this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The `BootImage` this machine should boot; unset means the default image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Where a machine is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MachinePhase {
    /// Seen by the PXE server, nothing more.
    #[default]
    Discovered,
    /// The agent exchanged its token for a machine certificate.
    Enrolled,
    /// Claimed by a worker pool.
    Assigned,
    /// Downloading and installing node software.
    Installing,
    /// The kubelet is joining the tenant cluster.
    Joining,
    /// A healthy node of its tenant cluster.
    Ready,
    /// Moving to a new image.
    Upgrading,
    /// Returning to the previous image after a failed upgrade.
    RollingBack,
    /// Needs attention; see conditions.
    Failed,
    /// Given back by its pool.
    Released,
}

/// What the agent and the operator last observed of a machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// Current phase.
    #[serde(default)]
    pub phase: MachinePhase,
    /// Hardware facts the agent reported when it enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<Facts>,
    /// Name of the Node object in the tenant cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Version of the image the machine is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_image: Option<String>,
    /// A/B slot booted on disk installs (`a` or `b`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_slot: Option<String>,
    /// RFC 3339 time of the agent's last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The tether-agent version that last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The address the machine API sees the agent at, when it is one of the machine's own
    /// (not a NAT's): the Node's IP, and the IP its serving certificate and the other
    /// nodes' routes use. (`nodeIP`, as Kubernetes spells `podIP` and `hostIP`.)
    #[serde(default, rename = "nodeIP", skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<String>,
    /// The tenant whose software is on the machine, as the agent reports it (absent: clean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The agent joins and needs a kubelet bootstrap token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub needs_bootstrap_token: bool,
    /// The machine certificate the API accepts for this Machine (and the one it replaced,
    /// until the agent has used the new one). Deleting the Machine revokes both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<MachineCertificate>,
    /// `AgentReachable` and the conditions the agent reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The machine certificate on record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineCertificate {
    /// Hex sha256 of the certificate's DER.
    pub sha256: String,
    /// Hex sha256 of its SubjectPublicKeyInfo: a retried enrollment or renewal with the
    /// same key gets this certificate back instead of a new one.
    pub key_sha256: String,
    /// The certificate (PEM): public, and what an idempotent retry returns.
    pub pem: String,
    /// RFC 3339 expiry.
    pub not_after: String,
    /// The previous certificate's sha256, still accepted until the new one is presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_sha256: Option<String>,
}

/// What the agent found out about its machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// SMBIOS/DMI system UUID (lower case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The MAC the machine booted from (PXE) or reaches the machine API through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mac: Option<String>,
    /// Every physical NIC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// Logical CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// Memory in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Block devices (no partitions, loop or RAM disks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// `uefi` or `bios`.
    #[serde(default)]
    pub boot_mode: String,
    /// A/B slot on disk installs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_slot: Option<String>,
    /// Kernel release.
    #[serde(default)]
    pub kernel: String,
    /// SMBIOS vendor and product, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
}

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    /// Kernel name (`enp1s0`).
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// IPv4/IPv6 addresses with prefix length.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// One disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Kernel name (`vda`).
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Model, when the kernel knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// One downloadable file of a boot image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Artifact {
    /// Where to fetch it from.
    pub url: String,
    /// Lower-case hex sha256 of its contents.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// An immutable node image, as produced by `tether-image build`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "tether.dev",
        version = "v1alpha1",
        kind = "BootImage",
        shortname = "bi",
        status = "BootImageStatus",
        printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BootImageSpec {
    /// Image version, e.g. `2026.11.1`.
    pub version: String,
    /// Artifacts by role: `kernel`, `initrd`, `rootfs`, ….
    pub artifacts: BTreeMap<String, Artifact>,
    /// Kernel command line the image needs (the PXE server appends per-machine values).
    #[serde(default)]
    pub cmdline: String,
    /// Base64 ed25519 signature of the image manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_signature: Option<String>,
}

/// Observed state of a boot image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootImageStatus {
    /// Machines currently running this image.
    #[serde(default)]
    pub machines: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_spec_round_trips_in_camel_case() {
        let spec = MachineSpec {
            macs: vec!["52:54:00:12:34:56".into()],
            pool: Some("workers".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["macs"][0], "52:54:00:12:34:56");
        assert_eq!(json["pool"], "workers");
        assert!(json.get("uuid").is_none());
        let back: MachineSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn status_fields_are_spelled_as_the_machine_api_writes_them() {
        let s: MachineStatus = serde_json::from_value(serde_json::json!({
            "nodeIP": "10.0.0.7", "tenant": "ns/t", "needsBootstrapToken": true,
        }))
        .unwrap();
        assert_eq!(s.node_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(s.tenant.as_deref(), Some("ns/t"));
        assert!(s.needs_bootstrap_token);
    }

    #[test]
    fn phase_defaults_to_discovered() {
        let status: MachineStatus = serde_json::from_str("{}").unwrap();
        assert_eq!(status.phase, MachinePhase::Discovered);
        assert!(serde_json::from_str::<MachineStatus>(r#"{"phase":"Exploded"}"#).is_err());
    }
}
