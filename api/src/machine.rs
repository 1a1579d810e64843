//! `Machine` (one physical or virtual server Tether knows of) and `BootImage` (an immutable
//! node image the PXE server can serve).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
        namespaced,
        status = "MachineStatus",
        printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
        printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
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
    /// Hardware facts reported by the agent (CPU, memory, disks, NICs), free-form.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, String>,
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
        namespaced,
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
    fn phase_defaults_to_discovered() {
        let status: MachineStatus = serde_json::from_str("{}").unwrap();
        assert_eq!(status.phase, MachinePhase::Discovered);
        assert!(serde_json::from_str::<MachineStatus>(r#"{"phase":"Exploded"}"#).is_err());
    }
}
