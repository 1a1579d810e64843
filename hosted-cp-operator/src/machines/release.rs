//! Giving a machine back (DESIGN.md "Lifecycle"), one stage per reconcile so a restart of
//! the operator picks up where it was:
//!
//! 1. **drain** (annotation `tether.dev/release=drain`): the Node is cordoned and its pods
//!    evicted through the eviction API (PodDisruptionBudgets hold it back; DaemonSet and
//!    mirror pods stay); the kubelet still runs, so pods end gracefully.
//! 2. **stop**: the Machine's phase becomes `Released`, which takes the join out of its
//!    desired config; its bootstrap tokens and join Secret are deleted. The agent stops the
//!    kubelet and containerd and wipes every trace of the tenant, then reports no tenant.
//! 3. **free**: once the agent reports that, the Node is deleted and the claim removed:
//!    the Machine is `Enrolled` and free for any pool.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, ResourceExt};
use serde_json::json;
use tether_api::{Machine, MachinePhase};

use super::bootstrap_tokens::{self, Minted};
use super::claim::{RELEASE_ANNOTATION, STAGE_DRAIN};
use super::join;
use super::tunnel_tokens;
use crate::error::Error;
use crate::machine_api::inventory::{Inventory, Written};

/// Every address the machine API knows for `m`: the node IP and the NICs' addresses.
pub fn known_ips(m: &Machine) -> Vec<IpAddr> {
    let Some(s) = m.status.as_ref() else {
        return Vec::new();
    };
    let nics = s
        .facts
        .iter()
        .flat_map(|f| f.nics.iter())
        .flat_map(|n| n.addresses.iter());
    let mut ips: Vec<IpAddr> = s
        .node_ip
        .iter()
        .chain(nics)
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Whether a pod stays through a drain: owned by a DaemonSet, a static (mirror) pod, or
/// finished already.
pub fn stays(p: &Pod) -> bool {
    let daemon = p.owner_references().iter().any(|o| o.kind == "DaemonSet");
    let mirror = p.annotations().contains_key("kubernetes.io/config.mirror");
    let done = p
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    daemon || mirror || done
}

/// Stage 0: mark `m` as being given back.
pub async fn start(inventory: &Inventory, m: &Machine) -> Result<(), Error> {
    tracing::info!(machine = %m.name_any(), "releasing: drain");
    inventory
        .patch_at(
            m,
            json!({"metadata": {"annotations": {RELEASE_ANNOTATION: STAGE_DRAIN}}}),
        )
        .await?;
    Ok(())
}

/// Moves `m` one stage along, with its tenant reachable.
pub async fn step(
    inventory: &Inventory,
    mgmt: &kube::Client,
    namespace: &str,
    tenant: &kube::Client,
    m: &Machine,
    minted: &[Minted],
) -> Result<(), Error> {
    let name = m.name_any();
    let phase = m.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if phase != MachinePhase::Released {
        if !drained(tenant, &name).await? {
            return Ok(());
        }
        bootstrap_tokens::delete(tenant, minted, &name).await?;
        tunnel_tokens::revoke(tenant, &name).await?;
        return stop(inventory, mgmt, namespace, m).await;
    }
    if !wiped(m) {
        return Ok(()); // no report since the release that says the node is clean
    }
    let nodes: Api<Node> = Api::all(tenant.clone());
    match nodes.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(machine = %name, "Node deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(Error::kube(format!("delete Node {name}"))(e)),
    }
    free(inventory, m).await
}

/// Moves `m` along when its tenant is gone (deleted with the pool): nothing to drain.
pub async fn step_without_tenant(
    inventory: &Inventory,
    mgmt: &kube::Client,
    namespace: &str,
    m: &Machine,
) -> Result<(), Error> {
    let status = m.status.clone().unwrap_or_default();
    if status.phase != MachinePhase::Released {
        return stop(inventory, mgmt, namespace, m).await;
    }
    if wiped(m) {
        return free(inventory, m).await;
    }
    Ok(())
}

/// Cordons Node `name` and evicts what must go; true once nothing is left to wait for.
async fn drained(tenant: &kube::Client, name: &str) -> Result<bool, Error> {
    let nodes: Api<Node> = Api::all(tenant.clone());
    let Some(node) = nodes
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get Node {name}")))?
    else {
        return Ok(true);
    };
    if !node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"unschedulable": true}})),
            )
            .await
            .map_err(Error::kube(format!("cordon Node {name}")))?;
        tracing::info!(node = name, "cordoned");
    }
    let pods: Api<Pod> = Api::all(tenant.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
        .await
        .map_err(Error::kube(format!("list the pods of Node {name}")))?
        .items;
    let leaving: Vec<&Pod> = on_node.iter().filter(|p| !stays(p)).collect();
    for p in leaving
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let ns = p.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(tenant.clone(), &ns);
        match api.evict(&p.name_any(), &EvictParams::default()).await {
            Ok(_) => {
                tracing::info!(node = name, pod = %format!("{ns}/{}", p.name_any()), "evicted")
            }
            // 429: a PodDisruptionBudget says not now; 404: gone already.
            Err(kube::Error::Api(e)) if e.code == 429 || e.code == 404 => {}
            Err(e) => return Err(Error::kube(format!("evict {ns}/{}", p.name_any()))(e)),
        }
    }
    Ok(leaving.is_empty())
}

/// Stage 2: the join goes away; the agent wipes the node.
async fn stop(
    inventory: &Inventory,
    mgmt: &kube::Client,
    namespace: &str,
    m: &Machine,
) -> Result<(), Error> {
    let name = m.name_any();
    let at = crate::kube::now_rfc3339();
    let marked = inventory
        .patch_at(m, json!({"metadata": {"annotations": {RELEASED_AT: at}}}))
        .await?;
    if marked == Written::Conflict {
        return Ok(()); // the next reconcile looks again
    }
    let m = &inventory
        .get(&name)
        .await?
        .ok_or(Error::NotYet("the released Machine"))?;
    let secrets: Api<Secret> = Api::namespaced(mgmt.clone(), namespace);
    crate::kube::delete_labelled_secret(
        &secrets,
        &join::secret_name(&name),
        (join::JOIN_LABEL, &name),
    )
    .await?;
    inventory
        .patch_status_at(
            m,
            json!({"status": {"phase": MachinePhase::Released, "needsBootstrapToken": false}}),
        )
        .await?;
    tracing::info!(machine = %name, "released: the agent wipes the node");
    Ok(())
}

/// Stage 3: the Machine is free again.
async fn free(inventory: &Inventory, m: &Machine) -> Result<(), Error> {
    let name = m.name_any();
    let freed = inventory
        .patch_at(m, json!({"metadata": {"annotations": {RELEASE_ANNOTATION: null, RELEASED_AT: null}}, "spec": {"pool": null}}))
        .await?;
    if freed == Written::Conflict {
        return Ok(()); // changed since it was read: the next reconcile looks again
    }
    // (Should this write be lost, the machine API makes an unclaimed Released Machine
    // Enrolled at its agent's next clean report.)
    for _ in 0..3 {
        let fresh = inventory
            .get(&name)
            .await?
            .ok_or(Error::NotYet("the released Machine"))?;
        let done = inventory
            .patch_status_at(&fresh, json!({"status": {"phase": MachinePhase::Enrolled}}))
            .await?;
        if done == Written::Yes {
            tracing::info!(machine = %name, "free again");
            return Ok(());
        }
    }
    Err(Error::NotYet("the freed Machine kept changing"))
}

/// Annotation: when the release's stop stage took the join away (RFC 3339).
pub const RELEASED_AT: &str = "tether.dev/released-at";

/// Whether the agent has said, in a report made after the join was taken away, that the
/// node holds nothing of the tenant — a report from before (or none at all, from an agent
/// that never got that far) does not count.
pub fn wiped(m: &Machine) -> bool {
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    let Some(s) = m.status.as_ref() else {
        return false;
    };
    let parse = |t: Option<&String>| t.and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
    let released = parse(m.annotations().get(RELEASED_AT));
    let seen = parse(s.last_seen.as_ref());
    s.phase == MachinePhase::Released
        && s.tenant.is_none()
        && matches!((released, seen), (Some(r), Some(l)) if l > r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use tether_api::{Facts, MachineStatus};

    #[test]
    fn known_ips_are_the_node_ip_and_the_nics() {
        let m = Machine {
            metadata: Default::default(),
            spec: Default::default(),
            status: Some(MachineStatus {
                node_ip: Some("10.0.0.7".into()),
                facts: Some(Facts {
                    nics: vec![tether_api::machine::Nic {
                        name: "eth0".into(),
                        mac: "52:54:00:00:00:01".into(),
                        addresses: vec!["10.0.0.7/24".into(), "fe80::1/64".into()],
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let ips: Vec<String> = known_ips(&m).iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.0.0.7", "fe80::1"]);
    }

    #[test]
    fn wiped_needs_a_clean_report_after_the_release() {
        let m = |tenant: Option<&str>, seen: &str, released: Option<&str>| {
            let mut m = Machine::new("m", Default::default());
            if let Some(r) = released {
                m.metadata.annotations = Some([(RELEASED_AT.to_string(), r.to_string())].into());
            }
            m.status = Some(MachineStatus {
                phase: MachinePhase::Released,
                tenant: tenant.map(Into::into),
                last_seen: Some(seen.into()),
                ..Default::default()
            });
            m
        };
        let (before, at, after) = (
            "2026-11-30T10:00:00Z",
            "2026-11-30T10:00:01Z",
            "2026-11-30T10:00:02Z",
        );
        assert!(wiped(&m(None, after, Some(at))));
        assert!(
            !wiped(&m(None, before, Some(at))),
            "a report from before the release"
        );
        assert!(
            !wiped(&m(Some("ns/t"), after, Some(at))),
            "still holds the tenant"
        );
        assert!(!wiped(&m(None, after, None)), "no release time");
        let mut not_released = m(None, after, Some(at));
        not_released.status.as_mut().unwrap().phase = MachinePhase::Ready;
        assert!(!wiped(&not_released));
    }

    #[test]
    fn daemonsets_mirrors_and_finished_pods_stay() {
        let mut p = Pod::default();
        assert!(!stays(&p));
        p.metadata.owner_references = Some(vec![OwnerReference {
            kind: "DaemonSet".into(),
            ..Default::default()
        }]);
        assert!(stays(&p));
        let mut q = Pod::default();
        q.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_string(), "x".to_string())].into());
        assert!(stays(&q));
        let r = Pod {
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some("Succeeded".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(stays(&r));
    }
}
