//! The tenant's components, run by the runtime (supervised processes, or a Deployment and
//! a Service), and the wait until its API server answers `/readyz`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use kube::api::Resource;
use kube::runtime::controller::Action;
use tether_api::TenantControlPlanePhase;

use crate::controlplane::component::ComponentSpec;
use crate::controlplane::kubeconfig::ADMIN;
use crate::controlplane::pipeline::{Flow, State, Step, Tenant, need};
use crate::controlplane::render::{self, RenderInputs};
use crate::controlplane::runtime::process::SecretData;
use crate::error::Error;
use crate::kube::{client_from_kubeconfig, condition, merge_conditions, wait_readyz};

/// Every component, rendered once and handed to the runtime.
pub struct Components;

impl Step for Components {
    fn name(&self) -> &'static str {
        "components"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(run(s))
    }

    fn cleanup<'a>(&'a self, t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        Some(Box::pin(async move {
            let uid = t.tcp.metadata.uid.as_deref();
            t.ctx.runtime.delete(&t.ns, &t.name, uid).await
        }))
    }
}

async fn run(s: &mut State<'_>) -> Result<Flow, Error> {
    let version = need(&s.version, "version-gate")?;
    let components = components(s)?;
    let data = secret_data(s)?;
    let t = &s.t;
    if version.upgrading && s.status.phase != TenantControlPlanePhase::Upgrading {
        s.status.phase = TenantControlPlanePhase::Upgrading;
        t.patch_status(&s.status).await?;
    }
    let owner = t.tcp.controller_owner_ref(&());
    let spec = &t.tcp.spec;
    let applied = t
        .ctx
        .runtime
        .apply(&t.ns, &t.name, spec, &components, &data, owner)
        .await;
    match applied {
        Err(Error::Conflict(msg)) => Ok(Flow::Refuse(condition(
            "ControlPlaneAvailable",
            false,
            "NameConflict",
            msg,
            t.generation(),
        ))),
        Err(e) => Err(e),
        Ok(()) => Ok(Flow::Next),
    }
}

/// The components for what the earlier steps decided.
fn components(s: &State<'_>) -> Result<Vec<ComponentSpec>, Error> {
    let placement = need(&s.placement, "placement")?;
    let (storage, _) = need(&s.storage, "datastore")?;
    Ok(render::render(&RenderInputs {
        spec: &s.t.tcp.spec,
        version: &need(&s.version, "version-gate")?.run,
        storage: storage.clone(),
        ports: placement.ports,
        bind_address: placement.bind_address.clone(),
        advertise_address: placement.advertise_address.clone(),
        secrets: s.t.names(),
        replicas: placement.replicas,
    }))
}

/// Every Secret the components may read, by name.
fn secret_data(s: &State<'_>) -> Result<SecretData, Error> {
    let names = s.t.names();
    Ok(BTreeMap::from([
        (names.pki, need(&s.pki, "pki")?.files.clone()),
        (
            names.kubeconfigs,
            need(&s.kubeconfigs, "kubeconfigs")?.clone(),
        ),
        (names.datastore, need(&s.storage, "datastore")?.1.clone()),
        (names.config, need(&s.config, "config")?.clone()),
    ]))
}

/// Waits (as long as the runtime's placement says) for the API server's `/readyz`; a
/// tenant that is not ready yet is NotReady and looked at again in 2 s.
pub struct Readyz;

impl Step for Readyz {
    fn name(&self) -> &'static str {
        "readyz"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(wait(s))
    }
}

async fn wait(s: &mut State<'_>) -> Result<Flow, Error> {
    let wait = need(&s.placement, "placement")?.readyz_wait;
    let admin = &need(&s.kubeconfigs, "kubeconfigs")?[ADMIN];
    let tenant = client_from_kubeconfig(&String::from_utf8_lossy(admin)).await?;
    if let Err(e) = wait_readyz(&tenant, wait).await {
        s.status.phase = TenantControlPlanePhase::NotReady;
        let c = condition(
            "ControlPlaneAvailable",
            false,
            "NotReady",
            e.to_string(),
            s.t.generation(),
        );
        s.status.conditions = merge_conditions(&s.status.conditions, vec![c]);
        s.t.patch_status(&s.status).await?;
        return Ok(Flow::Done(Action::requeue(Duration::from_secs(2))));
    }
    s.tenant_client = Some(tenant);
    Ok(Flow::Next)
}
