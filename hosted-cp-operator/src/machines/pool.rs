//! The WorkerPool controller, kube-rs style (`reconcile` + `error_policy` + [`Context`],
//! a finalizer, and a watch on Machines mapped to the pool that claims them).
//!
//! One reconcile of a pool: check the spec and the tenant; claim free machines up to
//! `replicas` or start giving back the surplus ([`super::claim`]); move releasing machines
//! along ([`super::release`]); render each kept machine's join with a bootstrap token while
//! it needs one ([`super::join`], [`super::bootstrap_tokens`]); approve or deny the tenant's
//! kubelet CSRs per Machine ([`super::csr`]); write the status. Deleting a pool releases
//! every machine before the finalizer lets it go.
//!
//! Nodes and CSRs live in the tenant, which the management cluster cannot watch from here,
//! so a pool whose machines are not all Ready is looked at again every [`BUSY`]; a settled
//! one every [`IDLE`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Api, ListParams, Resource, ResourceExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use serde_json::json;
use tether_api::tenant_control_plane::KubeVersion;
use tether_api::worker_pool::{check_kubelet_skew, pool_key};
use tether_api::{Machine, MachinePhase, TenantControlPlane, TenantControlPlanePhase, WorkerPool};

use super::bootstrap_tokens::{self, Minted};
use super::claim;
use super::csr::{self, Known};
use super::join::{self, NodeView, Tenancy};
use super::release;
use super::store::Store;
use super::tunnel_tokens;
use crate::error::Error;
use crate::kube::{
    Files, apply_secret, client_from_kubeconfig, condition, merge_conditions, patch_status,
    read_secret,
};
use crate::machine_api::inventory::{Inventory, Written};

/// The finalizer on every WorkerPool.
pub const FINALIZER: &str = "tether.dev/worker-pool";
/// Requeue of a pool with machines on their way.
pub const BUSY: Duration = Duration::from_secs(1);
/// Requeue of a settled pool.
pub const IDLE: Duration = Duration::from_secs(30);

/// Shared state of the controller.
pub struct Context {
    /// Management cluster client.
    pub client: kube::Client,
    /// The operator's namespace (join Secrets, the store's ConfigMap).
    pub namespace: String,
    /// Resolves node artifacts.
    pub store: Store,
    /// NTP servers joined machines are told (empty: DHCP's).
    pub ntp: Vec<String>,
    /// DNS servers joined machines are told (empty: DHCP's).
    pub dns: Vec<String>,
}

/// Runs the controller until the process is stopped.
pub async fn run(ctx: Arc<Context>) {
    let pools: Api<WorkerPool> = Api::all(ctx.client.clone());
    let machines: Api<Machine> = Api::all(ctx.client.clone());
    Controller::new(pools, watcher::Config::default())
        .watches(machines, watcher::Config::default(), |m: Machine| {
            let key = m.spec.pool?;
            let (ns, name) = key.split_once('/')?;
            Some(ObjectRef::<WorkerPool>::new(name).within(ns))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("pool reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(pool: Arc<WorkerPool>, err: &Error, _ctx: Arc<Context>) -> Action {
    match err {
        Error::NotYet(_) => tracing::debug!(pool = %pool.name_any(), "{err}"),
        _ => tracing::warn!(pool = %pool.name_any(), "reconcile failed: {err}"),
    }
    Action::requeue(BUSY)
}

async fn reconcile(pool: Arc<WorkerPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pool.namespace().unwrap_or_else(|| "default".into());
    let api: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            Event::Apply(p) => apply(&p, &ctx).await,
            Event::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Invalid(format!("finalizer: {other}")),
    })
}

/// The tenant of a pool, once it is Ready: its object, an admin client, the kubelet version.
struct Resolved {
    tcp: TenantControlPlane,
    client: kube::Client,
    version: String,
}

/// Why the pool cannot act yet or at all: `(reason, message)`.
type Blocked = (&'static str, String);

async fn resolve(pool: &WorkerPool, ctx: &Context) -> Result<Result<Resolved, Blocked>, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let spec = &pool.spec;
    // The pool's name ends the bootstrap tokens' group (`system:bootstrappers:tether:<pool>`),
    // which the API server accepts only in `[a-z0-9:-]`.
    let name = pool.name_any();
    if name.contains('.') {
        return Ok(Err((
            "InvalidSpec",
            format!("pool name {name:?}: no dots (it names the bootstrap tokens' group)"),
        )));
    }
    if let Err(e) = spec.machine_selector.validate() {
        return Ok(Err(("InvalidSpec", format!("spec.machineSelector: {e}"))));
    }
    if let Some(e) = spec
        .labels
        .keys()
        .find_map(|k| join::check_node_label(k).err())
    {
        return Ok(Err(("InvalidSpec", format!("spec.labels: {e}"))));
    }
    let tcps: Api<TenantControlPlane> = Api::namespaced(ctx.client.clone(), &ns);
    let tname = &spec.control_plane_ref.name;
    let Some(tcp) = tcps
        .get_opt(tname)
        .await
        .map_err(Error::kube(format!("get tcp/{tname}")))?
    else {
        return Ok(Err((
            "TenantNotFound",
            format!("no TenantControlPlane {ns}/{tname}"),
        )));
    };
    let status = tcp.status.clone().unwrap_or_default();
    let (Some(server), Some(secret), TenantControlPlanePhase::Ready) = (
        status.version.clone(),
        status.kubeconfig_secret.clone(),
        status.phase,
    ) else {
        return Ok(Err((
            "TenantNotReady",
            format!("TenantControlPlane {ns}/{tname} is not Ready"),
        )));
    };
    let version = spec
        .kubernetes_version
        .clone()
        .unwrap_or_else(|| server.clone());
    let skew = KubeVersion::parse(&version)
        .and_then(|k| check_kubelet_skew(&k, &KubeVersion::parse(&server)?));
    if let Err(e) = skew {
        return Ok(Err(("InvalidSpec", format!("spec.kubernetesVersion: {e}"))));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let files = read_secret(&secrets, &secret).await?;
    let admin = files
        .get(crate::controlplane::kubeconfig::ADMIN)
        .ok_or(Error::NotYet("the tenant's admin kubeconfig"))?;
    let client = client_from_kubeconfig(&String::from_utf8_lossy(admin)).await?;
    Ok(Ok(Resolved {
        tcp,
        client,
        version,
    }))
}

async fn apply(pool: &WorkerPool, ctx: &Context) -> Result<Action, Error> {
    let key = pool_key(&pool.namespace().unwrap_or_default(), &pool.name_any());
    let resolved = match resolve(pool, ctx).await? {
        Ok(r) => r,
        Err((reason, message)) => {
            tracing::info!(pool = %key, reason, "{message}");
            write_status(pool, ctx, &[], &[], None, Some((reason, message))).await?;
            return Ok(Action::requeue(if reason == "InvalidSpec" {
                IDLE
            } else {
                BUSY
            }));
        }
    };
    let inventory = Inventory::new(ctx.client.clone());
    let machines = inventory.list().await?;
    let owned = claim::owned(&machines, &key);
    let kept: Vec<&Machine> = owned
        .iter()
        .copied()
        .filter(|m| !claim::releasing(m))
        .collect();
    let want = pool.spec.replicas as usize;
    let mut changed = false;
    if kept.len() < want {
        for name in claim::to_claim(&machines, &pool.spec.machine_selector, want - kept.len()) {
            let m = machines
                .iter()
                .find(|m| m.name_any() == name)
                .expect("listed");
            let claimed = inventory
                .patch_at(m, json!({"spec": {"pool": key}}))
                .await?;
            tracing::info!(pool = %key, machine = %name, won = (claimed == Written::Yes), "claim");
            changed = true;
        }
    } else if kept.len() > want {
        for name in claim::to_release(&kept, kept.len() - want) {
            let m = machines
                .iter()
                .find(|m| m.name_any() == name)
                .expect("listed");
            release::start(&inventory, m).await?;
            changed = true;
        }
    }
    let machines = if changed {
        inventory.list().await?
    } else {
        machines
    };
    let owned = claim::owned(&machines, &key);
    let nodes: Vec<NodeView> = Api::<Node>::all(resolved.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list the tenant's Nodes"))?
        .items
        .iter()
        .map(NodeView::of)
        .collect();
    let keys = tenant_pool_keys(ctx, pool, &resolved).await?;
    let peers: BTreeMap<String, String> = machines
        .iter()
        .filter(|m| m.spec.pool.as_ref().is_some_and(|k| keys.contains(k)))
        .filter_map(|m| Some((m.name_any(), m.status.as_ref()?.node_ip.clone()?)))
        .collect();
    let route_to = join::route_targets(&nodes, &peers, &resolved.tcp.spec.network_profile.pod_cidr);
    let minted = bootstrap_tokens::list(&resolved.client).await?;
    let (releasing, kept): (Vec<&Machine>, Vec<&Machine>) =
        owned.into_iter().partition(|m| claim::releasing(m));
    for m in &releasing {
        release::step(
            &inventory,
            &ctx.client,
            &ctx.namespace,
            &resolved.client,
            m,
            &minted,
        )
        .await?;
    }
    let tenancy = tenancy(&resolved, ctx).await?;
    let artifacts = ctx
        .store
        .node_artifacts(&tenancy.store, &resolved.version)
        .await?;
    for m in &kept {
        ensure_join(
            ctx,
            &inventory,
            &resolved.client,
            pool,
            &tenancy,
            &artifacts,
            m,
            &minted,
            &route_to,
        )
        .await?;
    }
    // Tunnel tokens only for machines this tenant's pools hold, and only with konnectivity.
    let tunnels: BTreeSet<String> = match tenancy.konnectivity {
        Some(_) => peers_of(&machines, &keys),
        None => BTreeSet::new(),
    };
    tunnel_tokens::sweep(&resolved.client, &tunnels).await?;
    sweep_csrs(&resolved, &keys, &machines, &nodes).await?;
    write_status(pool, ctx, &kept, &nodes, Some(&resolved.version), None).await?;
    let ready = kept.iter().filter(|m| node_ready(&nodes, m)).count();
    let settled = releasing.is_empty() && kept.len() == want && ready == want;
    Ok(Action::requeue(if settled { IDLE } else { BUSY }))
}

/// The Machines any of the tenant's pools (`keys`) holds.
fn peers_of(machines: &[Machine], keys: &BTreeSet<String>) -> BTreeSet<String> {
    machines
        .iter()
        .filter(|m| m.spec.pool.as_ref().is_some_and(|k| keys.contains(k)))
        .map(|m| m.name_any())
        .collect()
}

fn node_ready(nodes: &[NodeView], m: &Machine) -> bool {
    nodes.iter().any(|n| n.name == m.name_any() && n.ready)
}

/// The tenant as joins need it.
async fn tenancy(r: &Resolved, ctx: &Context) -> Result<Tenancy, Error> {
    let ns = r.tcp.namespace().unwrap_or_default();
    let status = r.tcp.status.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let pki = read_secret(&secrets, &format!("{}-pki", r.tcp.name_any())).await?;
    let ca = pki.get("ca.crt").ok_or(Error::NotYet("the tenant's CA"))?;
    let np = &r.tcp.spec.network_profile;
    Ok(Tenancy {
        key: pool_key(&ns, &r.tcp.name_any()),
        api_server: status
            .endpoint
            .clone()
            .ok_or(Error::NotYet("the tenant's endpoint"))?,
        ca: String::from_utf8_lossy(ca).into_owned(),
        konnectivity: status.konnectivity_endpoint.clone(),
        pod_cidr: np.pod_cidr.clone(),
        service_cidr: np.service_cidr.clone(),
        cluster_dns: crate::controlplane::addons::dns_ip(&r.tcp.spec)
            .ok_or_else(|| Error::Invalid("the tenant has no DNS service IP".into()))?,
        cluster_domain: np.cluster_domain.clone(),
        kubernetes_version: r.version.clone(),
        sandbox_image: format!(
            "registry.k8s.io/pause:{}",
            tether_upstream::Pins::default().pause
        ),
        store: Store::address(&ctx.client, &ctx.namespace).await?,
        ntp: ctx.ntp.clone(),
        dns: ctx.dns.clone(),
    })
}

/// A kept machine: Assigned once claimed, a bootstrap token while it needs one, its join
/// Secret current.
#[allow(clippy::too_many_arguments)]
async fn ensure_join(
    ctx: &Context,
    inventory: &Inventory,
    tenant: &kube::Client,
    pool: &WorkerPool,
    tenancy: &Tenancy,
    artifacts: &[tether_api::machine_api::NodeArtifact],
    m: &Machine,
    minted: &[Minted],
    nodes: &[NodeView],
) -> Result<(), Error> {
    let name = m.name_any();
    let status = m.status.clone().unwrap_or_default();
    if status.phase == MachinePhase::Enrolled {
        inventory
            .patch_status_at(m, json!({"status": {"phase": MachinePhase::Assigned}}))
            .await?;
    }
    // Until the agent says otherwise, a claimed machine holding nothing of the tenant (new,
    // or diskless and just rebooted) needs a token.
    let needs = status.needs_bootstrap_token || status.tenant.is_none();
    let now = time::OffsetDateTime::now_utc();
    let token = if needs {
        let usable = minted
            .iter()
            .filter(|t| t.machine == name && t.usable(now))
            .max_by_key(|t| t.expires);
        Some(match usable {
            Some(t) => t.token.token(),
            None => bootstrap_tokens::mint(tenant, &name, &pool.name_any())
                .await?
                .token
                .token(),
        })
    } else {
        bootstrap_tokens::delete(tenant, minted, &name).await?;
        None
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret = join::secret_name(&name);
    let current = read_secret(&secrets, &secret).await?;
    let tunnel = match &tenancy.konnectivity {
        None => None,
        // A token the tenant will not mint now must not stall the pool's other machines
        // (nor CSR approval): the join keeps the one it has, and the next pass tries again.
        Some(_) => match tunnel_token(tenant, &name, &current, now).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(machine = %name, "tunnel token: {e}; the join keeps its current one");
                join::issued_tunnel(&current)
            }
        },
    };
    let join = join::render(
        m,
        pool,
        tenancy,
        artifacts.to_vec(),
        token,
        tunnel.as_ref(),
        nodes,
    );
    let bytes = serde_json::to_vec_pretty(&join).expect("a join serializes");
    let mut files = Files::from([
        (join::JOIN_KEY.to_string(), bytes),
        (
            join::POOL_KEY.to_string(),
            m.spec.pool.clone().unwrap_or_default().into_bytes(),
        ),
        (
            join::MACHINE_UID_KEY.to_string(),
            m.metadata.uid.clone().unwrap_or_default().into_bytes(),
        ),
    ]);
    if let Some(t) = &tunnel {
        files.insert(
            join::TUNNEL_ANCHOR_KEY.to_string(),
            t.anchor_uid.clone().into_bytes(),
        );
    }
    if current != files {
        let labels = [(join::JOIN_LABEL.to_string(), name.clone())].into();
        // Owned by the Machine: deleting it takes its join along.
        let owner = m.controller_owner_ref(&()).map(|mut o| {
            o.controller = None;
            o.block_owner_deletion = None;
            o
        });
        apply_secret(&secrets, &secret, labels, owner, &files).await?;
        tracing::info!(machine = %name, token = join.bootstrap_token.is_some(), "join rendered");
    }
    Ok(())
}

/// The tunnel token for `machine`'s join: the one it has while reusable, else a new one.
async fn tunnel_token(
    tenant: &kube::Client,
    machine: &str,
    current: &Files,
    now: time::OffsetDateTime,
) -> Result<tunnel_tokens::Issued, Error> {
    let anchor = tunnel_tokens::anchor(tenant, machine).await?;
    match join::issued_tunnel(current) {
        Some(t) if t.reusable(&anchor, now) => Ok(t),
        _ => tunnel_tokens::mint(tenant, machine, &anchor).await,
    }
}

/// The keys (`<ns>/<name>`) of every pool of the pool's tenant.
async fn tenant_pool_keys(
    ctx: &Context,
    pool: &WorkerPool,
    r: &Resolved,
) -> Result<BTreeSet<String>, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let pools: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), &ns);
    Ok(pools
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list WorkerPools"))?
        .items
        .iter()
        .filter(|p| p.spec.control_plane_ref.name == r.tcp.name_any())
        .map(|p| pool_key(&ns, &p.name_any()))
        .collect())
}

/// Approves or denies the tenant's pending kubelet CSRs, knowing every Machine any pool of
/// this tenant (`keys`) holds.
async fn sweep_csrs(
    r: &Resolved,
    keys: &BTreeSet<String>,
    machines: &[Machine],
    nodes: &[NodeView],
) -> Result<(), Error> {
    let minted = bootstrap_tokens::list(&r.client).await?;
    let known: Vec<Known> = machines
        .iter()
        .filter(|m| m.spec.pool.as_ref().is_some_and(|k| keys.contains(k)))
        .map(|m| Known {
            node_name: m.name_any(),
            token_ids: minted
                .iter()
                .filter(|t| t.machine == m.name_any())
                .map(|t| t.token.id.clone())
                .collect(),
            ips: release::known_ips(m),
        })
        .collect();
    let names: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    for (csr, verdict) in csr::sweep(&r.client, &known, &names).await? {
        tracing::info!(tenant = %r.tcp.name_any(), %csr, ?verdict, "kubelet CSR");
    }
    Ok(())
}

async fn write_status(
    pool: &WorkerPool,
    ctx: &Context,
    kept: &[&Machine],
    nodes: &[NodeView],
    version: Option<&str>,
    blocked: Option<Blocked>,
) -> Result<(), Error> {
    let ready = kept.iter().filter(|m| node_ready(nodes, m)).count() as u32;
    let want = pool.spec.replicas;
    let old = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let c = match &blocked {
        Some((reason, message)) => condition("Ready", false, reason, message, generation),
        None if ready == want && kept.len() as u32 == want => condition(
            "Ready",
            true,
            "AllNodesReady",
            format!("{ready} of {want} Nodes Ready"),
            generation,
        ),
        None => condition(
            "Ready",
            false,
            "Scaling",
            format!("{} claimed, {ready} of {want} Nodes Ready", kept.len()),
            generation,
        ),
    };
    let status = json!({
        "replicas": kept.len(),
        "readyReplicas": ready,
        "updatedReplicas": ready,
        "kubernetesVersion": version.or(old.kubernetes_version.as_deref()),
        "selector": pool.spec.machine_selector.to_query(),
        "conditions": merge_conditions(&old.conditions, vec![c]),
        "observedGeneration": generation,
    });
    let api: Api<WorkerPool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    patch_status(&api, &pool.name_any(), &status).await
}

/// Deletes every WorkerPool of tenant `tcp` in `ns`; how many still exist (they go once
/// their machines are released).
pub async fn delete_pools_of(client: &kube::Client, ns: &str, tcp: &str) -> Result<usize, Error> {
    let api: Api<WorkerPool> = Api::namespaced(client.clone(), ns);
    let pools = api
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list WorkerPools"))?
        .items;
    let mut left = 0;
    for p in pools
        .iter()
        .filter(|p| p.spec.control_plane_ref.name == tcp)
    {
        left += 1;
        if p.metadata.deletion_timestamp.is_none() {
            tracing::info!(pool = %p.name_any(), tenant = tcp, "deleting the pool with its tenant");
            match api
                .delete(&p.name_any(), &kube::api::DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => left -= 1,
                Err(e) => {
                    return Err(Error::kube(format!("delete WorkerPool {}", p.name_any()))(
                        e,
                    ));
                }
            }
        }
    }
    Ok(left)
}

/// Pool deletion: every machine released before the finalizer goes.
async fn cleanup(pool: &WorkerPool, ctx: &Context) -> Result<Action, Error> {
    let key = pool_key(&pool.namespace().unwrap_or_default(), &pool.name_any());
    let inventory = Inventory::new(ctx.client.clone());
    let machines = inventory.list().await?;
    let owned = claim::owned(&machines, &key);
    if owned.is_empty() {
        return Ok(Action::await_change());
    }
    let tenant = match resolve(pool, ctx).await? {
        Ok(r) => Some(r.client),
        Err(_) => None,
    };
    for m in &owned {
        if !claim::releasing(m) {
            release::start(&inventory, m).await?;
        } else if let Some(t) = &tenant {
            let minted = bootstrap_tokens::list(t).await?;
            release::step(&inventory, &ctx.client, &ctx.namespace, t, m, &minted).await?;
        } else {
            release::step_without_tenant(&inventory, &ctx.client, &ctx.namespace, m).await?;
        }
    }
    Err(Error::NotYet("the pool's machines to be released"))
}
