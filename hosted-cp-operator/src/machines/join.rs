//! The join half of a claimed Machine's desired config ([`tether_api::machine_api::Join`]):
//! rendered by the pool controller from the pool, its tenant and the tenant's Nodes
//! ([`render`], pure), kept in the Secret `tether-join-<machine>` in the operator's namespace
//! (it carries a bootstrap token), and served by the machine API to that Machine only.

use std::collections::BTreeMap;

use kube::ResourceExt;
use tether_api::machine::provider_id;
use tether_api::machine_api::{
    ContainerdSettings, Join, KubeletSettings, Mirror, NodeArtifact, PodRoute, Tunnel,
};

use super::tunnel_tokens::Issued;
use tether_api::{Machine, WorkerPool};

/// Label on every join Secret; its value is the Machine's name.
pub const JOIN_LABEL: &str = "tether.dev/join";
/// The join Secret's key holding the JSON.
pub const JOIN_KEY: &str = "join.json";
/// The join Secret's key naming the pool (`<ns>/<name>`) it was rendered for.
pub const POOL_KEY: &str = "pool";
/// The join Secret's key holding the UID of the Machine it was rendered for.
pub const MACHINE_UID_KEY: &str = "machineUid";
/// The join Secret's key holding the UID of the anchor its tunnel token is bound to.
pub const TUNNEL_ANCHOR_KEY: &str = "tunnelAnchorUid";

/// The tunnel token a join Secret's `files` hand out, if any.
pub fn issued_tunnel(files: &BTreeMap<String, Vec<u8>>) -> Option<Issued> {
    let join: Join = serde_json::from_slice(files.get(JOIN_KEY)?).ok()?;
    let tunnel = join.tunnel?;
    Some(Issued {
        token: tunnel.token,
        expires: tunnel.token_expires,
        anchor_uid: String::from_utf8(files.get(TUNNEL_ANCHOR_KEY)?.clone()).ok()?,
    })
}

/// Whether a join Secret's `files` were rendered for `machine` as it is now: the same
/// Machine object (a deleted and re-made namesake has another UID) claimed by the same
/// pool. A join left behind must never reach a machine another pool (or tenant) holds.
pub fn bound_to(files: &std::collections::BTreeMap<String, Vec<u8>>, machine: &Machine) -> bool {
    let uid = machine.metadata.uid.as_deref().unwrap_or_default();
    let pool = machine.spec.pool.as_deref().unwrap_or_default();
    !uid.is_empty()
        && !pool.is_empty()
        && files.get(MACHINE_UID_KEY).map(Vec::as_slice) == Some(uid.as_bytes())
        && files.get(POOL_KEY).map(Vec::as_slice) == Some(pool.as_bytes())
}
/// The Node label naming the pool (every pool's Nodes carry it).
pub const POOL_LABEL: &str = "tether.dev/pool";

/// The join Secret of Machine `machine`.
pub fn secret_name(machine: &str) -> String {
    format!("tether-join-{machine}")
}

/// What a pool's machines join: the tenant as the operator resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenancy {
    /// `<namespace>/<name>` of the TenantControlPlane.
    pub key: String,
    /// `https://host:port`.
    pub api_server: String,
    /// The cluster CA (PEM).
    pub ca: String,
    /// The konnectivity agent endpoint.
    pub konnectivity: Option<String>,
    /// The tenant's pod network.
    pub pod_cidr: String,
    /// The tenant's service network.
    pub service_cidr: String,
    /// The cluster DNS service IP.
    pub cluster_dns: String,
    /// The cluster domain.
    pub cluster_domain: String,
    /// The kubelet version the pool installs.
    pub kubernetes_version: String,
    /// The pause image (`registry.k8s.io/pause:<pinned>`).
    pub sandbox_image: String,
    /// The artifact store, `host:port`.
    pub store: String,
    /// NTP servers for the nodes (empty: DHCP's).
    pub ntp: Vec<String>,
    /// DNS servers for the nodes (empty: DHCP's).
    pub dns: Vec<String>,
}

/// A Node of the tenant, as routes need it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// `spec.podCIDR`.
    pub pod_cidr: Option<String>,
    /// The first `InternalIP`.
    pub internal_ip: Option<String>,
    /// The `Ready` condition is True.
    pub ready: bool,
}

impl NodeView {
    /// The view of a Node object.
    pub fn of(n: &k8s_openapi::api::core::v1::Node) -> NodeView {
        let status = n.status.as_ref();
        NodeView {
            name: n.name_any(),
            pod_cidr: n.spec.as_ref().and_then(|s| s.pod_cidr.clone()),
            internal_ip: status
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                .map(|a| a.address.clone()),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        }
    }
}

/// The Nodes host-gw routes may point at: only Nodes of Machines this tenant's pools hold
/// (`peers`: Machine name → the node IP the machine API knows), through that IP — not the
/// address a kubelet reports — and only for a pod CIDR inside the tenant's `pod_cidr`. A
/// Node anyone with rights in the tenant can create must not redirect a machine's traffic.
pub fn route_targets(
    nodes: &[NodeView],
    peers: &BTreeMap<String, String>,
    pod_cidr: &str,
) -> Vec<NodeView> {
    use tether_api::tenant_control_plane::Cidr;
    let Ok(range) = Cidr::parse(pod_cidr) else {
        return Vec::new();
    };
    nodes
        .iter()
        .filter_map(|n| {
            let ip = peers.get(&n.name)?;
            let cidr = Cidr::parse(n.pod_cidr.as_deref()?).ok()?;
            let inside = range.contains(cidr.addr) && cidr.prefix >= range.prefix;
            inside.then(|| NodeView {
                internal_ip: Some(ip.clone()),
                ..n.clone()
            })
        })
        .collect()
}

/// Why a Node label may not be set by the kubelet itself (the NodeRestriction admission
/// plugin refuses the `kubernetes.io`/`k8s.io` namespaces but for a few prefixes).
pub fn check_node_label(key: &str) -> Result<(), String> {
    let prefix = key.split_once('/').map(|(p, _)| p).unwrap_or("");
    let restricted = prefix == "kubernetes.io"
        || prefix == "k8s.io"
        || prefix.ends_with(".kubernetes.io")
        || prefix.ends_with(".k8s.io");
    let allowed = ["kubelet.kubernetes.io", "node.kubernetes.io"]
        .iter()
        .any(|ok| prefix == *ok || prefix.ends_with(&format!(".{ok}")));
    if restricted && !allowed {
        return Err(format!(
            "label {key:?}: a kubelet may not set labels under {prefix} (NodeRestriction)"
        ));
    }
    Ok(())
}

/// The join of `machine` in `pool` (of tenant `t`), with `token` while it needs one and
/// routes to the pod CIDRs of the tenant's other `nodes`. (The node reads its own podCIDR
/// from its Node, with the kubelet's credentials.)
pub fn render(
    machine: &Machine,
    pool: &WorkerPool,
    t: &Tenancy,
    artifacts: Vec<NodeArtifact>,
    token: Option<String>,
    tunnel: Option<&Issued>,
    nodes: &[NodeView],
) -> Join {
    let name = machine.name_any();
    let mut labels: BTreeMap<String, String> = pool.spec.labels.clone();
    labels.insert(POOL_LABEL.into(), pool.name_any());
    let mut routes: Vec<PodRoute> = nodes
        .iter()
        .filter(|n| n.name != name)
        .filter_map(|n| {
            Some(PodRoute {
                cidr: n.pod_cidr.clone()?,
                via: n.internal_ip.clone()?,
            })
        })
        .collect();
    routes.sort_by(|a, b| a.cidr.cmp(&b.cidr));
    Join {
        tenant: t.key.clone(),
        api_server: t.api_server.clone(),
        ca: t.ca.clone(),
        tunnel: t
            .konnectivity
            .as_ref()
            .zip(tunnel)
            .map(|(server, issued)| Tunnel {
                server: server.clone(),
                token: issued.token.clone(),
                token_expires: issued.expires.clone(),
                pod_cidr: t.pod_cidr.clone(),
                service_cidr: t.service_cidr.clone(),
            }),
        bootstrap_token: token,
        kubernetes_version: t.kubernetes_version.clone(),
        node_name: name.clone(),
        node_ip: machine.status.as_ref().and_then(|s| s.node_ip.clone()),
        artifacts,
        kubelet: KubeletSettings {
            cluster_dns: t.cluster_dns.clone(),
            cluster_domain: t.cluster_domain.clone(),
            labels,
            taints: pool
                .spec
                .taints
                .iter()
                .map(|x| format!("{}={}:{}", x.key, x.value, x.effect))
                .collect(),
            provider_id: provider_id(&name),
        },
        containerd: ContainerdSettings {
            sandbox_image: t.sandbox_image.clone(),
            mirrors: tether_api::artifacts::MIRRORED_REGISTRIES
                .iter()
                .map(|r| Mirror {
                    registry: r.to_string(),
                    endpoint: t.store.clone(),
                })
                .collect(),
        },
        routes,
        ntp: t.ntp.clone(),
        dns: t.dns.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;
    use tether_api::worker_pool::{LocalRef, Taint};
    use tether_api::{MachineStatus, WorkerPoolSpec};

    fn tenancy() -> Tenancy {
        Tenancy {
            key: "ns/t".into(),
            api_server: "https://10.0.0.1:6443".into(),
            ca: "CA".into(),
            konnectivity: Some("10.0.0.1:8132".into()),
            pod_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.96.0.0/12".into(),
            cluster_dns: "10.96.0.10".into(),
            cluster_domain: "cluster.local".into(),
            kubernetes_version: "v1.36.0".into(),
            sandbox_image: "registry.k8s.io/pause:3.10".into(),
            store: "10.0.0.1:5000".into(),
            ntp: vec!["10.0.0.1".into()],
            dns: vec![],
        }
    }

    #[test]
    fn renders_node_identity_routes_and_mirrors() {
        let machine = Machine {
            metadata: ObjectMeta {
                name: Some("m1".into()),
                ..Default::default()
            },
            spec: Default::default(),
            status: Some(MachineStatus {
                node_ip: Some("10.0.0.7".into()),
                ..Default::default()
            }),
        };
        let mut pool = WorkerPool::new(
            "workers",
            WorkerPoolSpec {
                control_plane_ref: LocalRef { name: "t".into() },
                replicas: 2,
                labels: [("tier".to_string(), "web".to_string())].into(),
                taints: vec![Taint {
                    key: "gpu".into(),
                    value: "".into(),
                    effect: "NoSchedule".into(),
                }],
                ..Default::default()
            },
        );
        pool.metadata.namespace = Some("ns".into());
        let nodes = [
            NodeView {
                name: "m1".into(),
                pod_cidr: Some("10.244.1.0/24".into()),
                internal_ip: Some("10.0.0.7".into()),
                ready: true,
            },
            NodeView {
                name: "m2".into(),
                pod_cidr: Some("10.244.0.0/24".into()),
                internal_ip: Some("10.0.0.8".into()),
                ready: true,
            },
            NodeView {
                name: "m3".into(),
                pod_cidr: None,
                internal_ip: Some("10.0.0.9".into()),
                ready: false,
            },
        ];
        let j = render(
            &machine,
            &pool,
            &tenancy(),
            vec![],
            Some("abcdef.0123456789abcdef".into()),
            Some(&Issued {
                token: "jwt".into(),
                expires: "2026-11-30T11:00:00Z".into(),
                anchor_uid: "a1".into(),
            }),
            &nodes,
        );
        assert_eq!(j.node_name, "m1");
        assert_eq!(j.node_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(
            j.routes,
            [PodRoute {
                cidr: "10.244.0.0/24".into(),
                via: "10.0.0.8".into()
            }]
        );
        assert_eq!(j.kubelet.provider_id, "tether://m1");
        assert_eq!(j.kubelet.labels["tether.dev/pool"], "workers");
        assert_eq!(j.kubelet.labels["tier"], "web");
        assert_eq!(j.kubelet.taints, ["gpu=:NoSchedule"]);
        assert!(
            j.containerd
                .mirrors
                .iter()
                .any(|m| m.registry == "registry.k8s.io" && m.endpoint == "10.0.0.1:5000")
        );
        assert_eq!(
            j.bootstrap_token.as_deref(),
            Some("abcdef.0123456789abcdef")
        );
        let tunnel = j.tunnel.as_ref().unwrap();
        assert_eq!(
            (tunnel.server.as_str(), tunnel.token.as_str()),
            ("10.0.0.1:8132", "jwt")
        );
        assert_eq!(
            (tunnel.pod_cidr.as_str(), tunnel.service_cidr.as_str()),
            ("10.244.0.0/16", "10.96.0.0/12")
        );
        // The token handed out is read back from the Secret, with its anchor.
        let files: BTreeMap<String, Vec<u8>> = [
            (JOIN_KEY.to_string(), serde_json::to_vec(&j).unwrap()),
            (TUNNEL_ANCHOR_KEY.to_string(), b"a1".to_vec()),
        ]
        .into();
        assert_eq!(
            issued_tunnel(&files).map(|i| (i.token, i.expires, i.anchor_uid)),
            Some(("jwt".into(), "2026-11-30T11:00:00Z".into(), "a1".into()))
        );
        // No konnectivity in the tenant: no tunnel, whatever the token.
        let mut without = tenancy();
        without.konnectivity = None;
        let j = render(&machine, &pool, &without, vec![], None, None, &nodes);
        assert!(j.tunnel.is_none());
    }

    #[test]
    fn a_join_reaches_only_the_machine_and_claim_it_was_made_for() {
        let mut m = Machine::new("m1", Default::default());
        m.metadata.uid = Some("uid-1".into());
        m.spec.pool = Some("ns/p".into());
        let files: std::collections::BTreeMap<String, Vec<u8>> = [
            (POOL_KEY.to_string(), b"ns/p".to_vec()),
            (MACHINE_UID_KEY.to_string(), b"uid-1".to_vec()),
        ]
        .into();
        assert!(bound_to(&files, &m));
        let mut other_pool = m.clone();
        other_pool.spec.pool = Some("ns2/q".into());
        let mut remade = m.clone();
        remade.metadata.uid = Some("uid-2".into());
        let mut unclaimed = m.clone();
        unclaimed.spec.pool = None;
        for (why, x) in [
            ("another pool", other_pool),
            ("a namesake", remade),
            ("unclaimed", unclaimed),
        ] {
            assert!(!bound_to(&files, &x), "{why}");
        }
        assert!(
            !bound_to(&Default::default(), &m),
            "an old Secret without the keys"
        );
    }

    #[test]
    fn routes_only_to_the_tenants_machines_inside_its_pod_range() {
        let n = |name: &str, cidr: &str, ip: &str| NodeView {
            name: name.into(),
            pod_cidr: Some(cidr.into()),
            internal_ip: Some(ip.into()),
            ready: true,
        };
        let nodes = [
            n("m1", "10.244.1.0/24", "10.0.0.7"),
            n("m2", "10.244.2.0/24", "10.0.0.66"),
            n("rogue", "10.244.3.0/24", "10.0.0.9"),
            n("m3", "0.0.0.0/0", "10.0.0.10"),
        ];
        let peers: BTreeMap<String, String> = [
            ("m1".to_string(), "10.0.0.7".to_string()),
            ("m2".to_string(), "10.0.0.8".to_string()),
            ("m3".to_string(), "10.0.0.10".to_string()),
        ]
        .into();
        let got = route_targets(&nodes, &peers, "10.244.0.0/16");
        let pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|n| (n.name.as_str(), n.internal_ip.as_deref().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [("m1", "10.0.0.7"), ("m2", "10.0.0.8")],
            "the machine API's IP, not the reported one; no rogue Node, no default route"
        );
    }

    #[test]
    fn node_labels_a_kubelet_may_set() {
        for ok in [
            "tier",
            "example.com/x",
            "node.kubernetes.io/instance-type",
            "kubelet.kubernetes.io/x",
        ] {
            assert!(check_node_label(ok).is_ok(), "{ok}");
        }
        for bad in [
            "node-role.kubernetes.io/worker",
            "kubernetes.io/hostname",
            "x.k8s.io/y",
        ] {
            assert!(check_node_label(bad).is_err(), "{bad}");
        }
    }
}
