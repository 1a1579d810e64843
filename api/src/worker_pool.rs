//! `WorkerPool`: a tenant's claim on the site's machines (DESIGN.md "Machines, identities and
//! tokens"). Namespaced next to its TenantControlPlane; it claims cluster-scoped Machines
//! that match its selector until it has `replicas` of them, and gives them back on scale-down
//! or deletion. The claim itself is recorded on the Machine (`spec.pool = <ns>/<name>`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tenant_control_plane::{Condition, KubeVersion};

/// A pool of worker machines of one tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "tether.dev",
        version = "v1alpha1",
        kind = "WorkerPool",
        shortname = "wp",
        namespaced,
        status = "WorkerPoolStatus",
        scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
        printcolumn = r#"{"name":"Tenant","type":"string","jsonPath":".spec.controlPlaneRef.name"}"#,
        printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas"}"#,
        printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.replicas"}"#,
        printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
        printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.kubernetesVersion"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolSpec {
    /// The TenantControlPlane (same namespace) the machines join.
    pub control_plane_ref: LocalRef,
    /// How many machines the pool holds.
    #[serde(default)]
    pub replicas: u32,
    /// Which Machines it may claim (their `metadata.labels`); empty selects every free one.
    #[serde(default)]
    pub machine_selector: LabelSelector,
    /// The BootImage its machines run; unset keeps the site's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The kubelet's version; unset means the tenant's. At most three minors older than the
    /// tenant's API server and never newer (the Kubernetes version skew policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// Labels every Node of the pool registers with (on top of `tether.dev/pool`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Taints every Node of the pool registers with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// How image and version changes roll through the pool (rolling upgrades: planned).
    #[serde(default)]
    pub upgrade: UpgradePolicy,
}

/// A reference to an object in the same namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LocalRef {
    /// Its name.
    pub name: String,
}

/// A standard label selector (`matchLabels` and `matchExpressions`), defined here so the
/// types need no k8s-openapi.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LabelRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// Values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector, as the API server decides it.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => got.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => got.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => got.is_some(),
                    "DoesNotExist" => got.is_none(),
                    _ => false,
                }
            })
    }

    /// Why the selector is invalid, if it is (an unknown operator, values where none
    /// belong or none where they must).
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.match_expressions {
            match (r.operator.as_str(), r.values.is_empty()) {
                ("In" | "NotIn", false) | ("Exists" | "DoesNotExist", true) => {}
                ("In" | "NotIn", true) => {
                    return Err(format!("{} {} needs values", r.key, r.operator));
                }
                ("Exists" | "DoesNotExist", false) => {
                    return Err(format!("{} {} takes no values", r.key, r.operator));
                }
                (op, _) => return Err(format!("{}: unknown operator {op:?}", r.key)),
            }
        }
        Ok(())
    }

    /// The selector as a label query string (`a=b,c in (d,e)`), for the scale subresource.
    pub fn to_query(&self) -> String {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator.as_str() {
                "In" => format!("{} in ({})", r.key, r.values.join(",")),
                "NotIn" => format!("{} notin ({})", r.key, r.values.join(",")),
                "Exists" => r.key.clone(),
                _ => format!("!{}", r.key),
            });
        }
        parts.join(",")
    }
}

/// A Node taint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// How changes roll through the pool (used by rolling upgrades, which are planned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradePolicy {
    /// Machines upgraded at once.
    #[serde(default = "one")]
    pub max_unavailable: u32,
    /// How long an upgraded node may take to pass its health gate (`10m`).
    #[serde(default = "ten_minutes")]
    pub health_timeout: String,
    /// Stop the rollout at the first failed node.
    #[serde(default = "yes")]
    pub pause_on_failure: bool,
}

fn one() -> u32 {
    1
}
fn ten_minutes() -> String {
    "10m".into()
}
fn yes() -> bool {
    true
}

impl Default for UpgradePolicy {
    fn default() -> Self {
        UpgradePolicy {
            max_unavailable: one(),
            health_timeout: ten_minutes(),
            pause_on_failure: yes(),
        }
    }
}

/// What the pool controller last observed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolStatus {
    /// Machines claimed.
    #[serde(default)]
    pub replicas: u32,
    /// Machines whose Node is Ready.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Machines running the pool's current version and image.
    #[serde(default)]
    pub updated_replicas: u32,
    /// The kubelet version the pool installs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// The selector as a label query (the scale subresource's `labelSelectorPath`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// `Ready`, `Scaled`, `SpecValid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The claim a pool writes into `Machine.spec.pool`: `<namespace>/<name>`.
pub fn pool_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Whether a kubelet of `kubelet` may join an API server of `server`: same major, not newer,
/// at most three minors older (the version skew policy since 1.28).
pub fn check_kubelet_skew(kubelet: &KubeVersion, server: &KubeVersion) -> Result<(), String> {
    if kubelet.major != server.major || kubelet.minor > server.minor {
        return Err(format!(
            "kubelet {kubelet} may not be newer than the API server ({server})"
        ));
    }
    if server.minor - kubelet.minor > 3 {
        return Err(format!(
            "kubelet {kubelet} is more than three minors older than the API server ({server})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelRequirement {
        LabelRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let m = labels(&[("rack", "r1"), ("gpu", "yes")]);
        let sel = |ml: &[(&str, &str)], me: Vec<LabelRequirement>| LabelSelector {
            match_labels: labels(ml),
            match_expressions: me,
        };
        let cases = [
            (sel(&[], vec![]), true),
            (sel(&[("rack", "r1")], vec![]), true),
            (sel(&[("rack", "r2")], vec![]), false),
            (sel(&[], vec![req("rack", "In", &["r1", "r3"])]), true),
            (sel(&[], vec![req("rack", "NotIn", &["r1"])]), false),
            (sel(&[], vec![req("zone", "NotIn", &["a"])]), true),
            (sel(&[], vec![req("gpu", "Exists", &[])]), true),
            (sel(&[], vec![req("gpu", "DoesNotExist", &[])]), false),
            (sel(&[], vec![req("gpu", "Like", &["y"])]), false),
        ];
        for (s, want) in cases {
            assert_eq!(s.matches(&m), want, "{s:?}");
        }
    }

    #[test]
    fn selectors_validate_and_render() {
        let s = LabelSelector {
            match_labels: labels(&[("rack", "r1")]),
            match_expressions: vec![req("zone", "In", &["a", "b"]), req("gpu", "Exists", &[])],
        };
        assert!(s.validate().is_ok());
        assert_eq!(s.to_query(), "rack=r1,zone in (a,b),gpu");
        for bad in [
            req("a", "In", &[]),
            req("a", "Exists", &["x"]),
            req("a", "Like", &["x"]),
        ] {
            let s = LabelSelector {
                match_expressions: vec![bad.clone()],
                ..Default::default()
            };
            assert!(s.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kubelet_skew() {
        let v = |s| KubeVersion::parse(s).unwrap();
        assert!(check_kubelet_skew(&v("v1.36.0"), &v("v1.36.2")).is_ok());
        assert!(check_kubelet_skew(&v("v1.33.9"), &v("v1.36.0")).is_ok());
        assert!(check_kubelet_skew(&v("v1.32.9"), &v("v1.36.0")).is_err());
        assert!(check_kubelet_skew(&v("v1.37.0"), &v("v1.36.0")).is_err());
    }

    #[test]
    fn spec_defaults() {
        let s: WorkerPoolSpec =
            serde_json::from_str(r#"{"controlPlaneRef":{"name":"t"},"replicas":2}"#).unwrap();
        assert_eq!(s.upgrade.max_unavailable, 1);
        assert!(s.machine_selector.match_labels.is_empty());
        assert_eq!(pool_key("ns", "p"), "ns/p");
    }
}
