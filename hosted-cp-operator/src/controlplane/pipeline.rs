//! The reconcile pipeline, after Kamaji's resource handlers: every object a tenant owns is
//! one [`Step`] whose apply and clean-up sit together. Apply runs the steps of
//! [`super::steps::STEPS`] in order, each timed into [`super::controller::Metrics`] under
//! its name; deletion runs the clean-ups in reverse order, timed as `cleanup-<name>`.
//!
//! Steps share a [`State`]: what earlier steps decided (the DataStore, the version to run,
//! the placement, the PKI, …) for later ones. A step that finds the input unacceptable
//! returns [`Flow::Refuse`]: the pipeline records the condition and a Warning Event and
//! changes nothing else, so a bad spec never leaves partial objects behind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Resource, ResourceExt};
use kube::runtime::controller::Action;
use tether_api::{
    Condition, TenantControlPlane, TenantControlPlanePhase, TenantControlPlaneStatus,
};

use super::controller::Context;
use super::render::{Secrets, Storage};
use super::runtime::Placement;
use super::steps::STEPS;
use super::steps::datastore::Chosen;
use super::steps::pki::TenantPki;
use super::steps::prepare::Version;
use super::{DEFAULT_DATASTORE, TENANT_LABEL};
use crate::error::Error;
use crate::kube::{self as k, Files};

/// What a step tells the pipeline.
#[derive(Debug)]
pub enum Flow {
    /// Go on with the next step.
    Next,
    /// The spec or a referenced object is not acceptable: record this condition (phase
    /// NotReady, a Warning Event), change nothing else, look again in 30 s.
    Refuse(Condition),
    /// End this reconcile here (something is not there yet) and requeue as given.
    Done(Action),
}

/// One owned object (or one decision) of a tenant: how to make it right, and how to remove
/// it when the tenant is deleted.
pub trait Step: Sync {
    /// The step's name: its metrics series and log field.
    fn name(&self) -> &'static str;

    /// Makes the object match the spec (idempotent: an unchanged tenant changes nothing).
    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>>;

    /// Removes what [`Step::apply`] made; `None` for a step that owns nothing.
    fn cleanup<'a>(&'a self, _t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        None
    }
}

/// The tenant being reconciled and where its objects live.
pub struct Tenant<'a> {
    /// The object as the controller saw it.
    pub tcp: &'a TenantControlPlane,
    /// The controller's shared state.
    pub ctx: &'a Context,
    /// Its namespace.
    pub ns: String,
    /// Its name.
    pub name: String,
    /// TenantControlPlanes of its namespace (status patches).
    pub api: Api<TenantControlPlane>,
    /// Secrets of its namespace.
    pub secrets: Api<Secret>,
}

impl<'a> Tenant<'a> {
    /// The tenant `tcp`, reconciled with `ctx`.
    pub fn new(tcp: &'a TenantControlPlane, ctx: &'a Context) -> Tenant<'a> {
        let ns = tcp.namespace().unwrap_or_else(|| "default".into());
        Tenant {
            tcp,
            ctx,
            api: Api::namespaced(ctx.client.clone(), &ns),
            secrets: Api::namespaced(ctx.client.clone(), &ns),
            name: tcp.name_any(),
            ns,
        }
    }

    /// The spec's generation (for conditions and `observedGeneration`).
    pub fn generation(&self) -> Option<i64> {
        self.tcp.metadata.generation
    }

    /// The names of the Secrets its components read.
    pub fn names(&self) -> Secrets {
        Secrets::for_tenant(&self.name)
    }

    /// The DataStore it lives on: fixed once recorded in status, else the spec's, else
    /// [`DEFAULT_DATASTORE`].
    pub fn datastore_name(&self) -> String {
        self.tcp
            .status
            .as_ref()
            .and_then(|s| s.data_store.clone())
            .or_else(|| self.tcp.spec.data_store.clone())
            .unwrap_or_else(|| DEFAULT_DATASTORE.into())
    }

    /// The data of its Secret `name` (empty when absent).
    pub async fn read_secret(&self, name: &str) -> Result<Files, Error> {
        k::read_secret(&self.secrets, name).await
    }

    /// Applies its Secret `name`: labelled with the tenant, owned by it.
    pub async fn apply_secret(&self, name: &str, data: &Files) -> Result<(), Error> {
        let labels = BTreeMap::from([(TENANT_LABEL.to_string(), self.name.clone())]);
        let owner = self.tcp.controller_owner_ref(&());
        k::apply_secret(&self.secrets, name, labels, owner, data).await
    }

    /// Deletes its Secret `name` (a namesake without the tenant's label is left alone).
    pub async fn delete_secret(&self, name: &str) -> Result<(), Error> {
        k::delete_labelled_secret(&self.secrets, name, (TENANT_LABEL, &self.name)).await
    }

    /// Writes `status`.
    pub async fn patch_status(&self, status: &TenantControlPlaneStatus) -> Result<(), Error> {
        k::patch_status(&self.api, &self.name, status).await
    }
}

/// What the steps of one apply decided so far. Each `Option` is filled by the step named
/// in its comment; a later step that needs it takes it with [`need`].
pub struct State<'a> {
    /// The tenant.
    pub t: Tenant<'a>,
    /// The status written at the end (or on the way, for phases a user should see early).
    pub status: TenantControlPlaneStatus,
    /// `datastore-lookup`: the DataStore and its administrator.
    pub datastore: Option<Chosen>,
    /// `version-gate`: the version to run.
    pub version: Option<Version>,
    /// `placement`: ports, addresses, endpoint.
    pub placement: Option<Placement>,
    /// `pki`: the PKI Secret's contents and the CA rotation step.
    pub pki: Option<TenantPki>,
    /// `kubeconfigs`: every kubeconfig, admin included.
    pub kubeconfigs: Option<Files>,
    /// `datastore`: how the API server reaches its data, and the datastore Secret.
    pub storage: Option<(Storage, Files)>,
    /// `config`: the config Secret.
    pub config: Option<Files>,
    /// `readyz`: an admin client of the tenant's API.
    pub tenant_client: Option<kube::Client>,
    /// `status`: when to look again.
    pub requeue: Duration,
}

/// The value an earlier step prepared, or an error naming the step that should have.
pub fn need<'v, T>(value: &'v Option<T>, step: &'static str) -> Result<&'v T, Error> {
    value.as_ref().ok_or(Error::StepOrder(step))
}

impl<'a> State<'a> {
    fn new(t: Tenant<'a>) -> State<'a> {
        State {
            status: t.tcp.status.clone().unwrap_or_default(),
            t,
            datastore: None,
            version: None,
            placement: None,
            pki: None,
            kubeconfigs: None,
            storage: None,
            config: None,
            tenant_client: None,
            requeue: Duration::from_secs(10),
        }
    }
}

/// Runs every step's apply in order. A step's time is recorded when it finished and the
/// pipeline went on (a refusal or an early end is not a sample of its work).
pub async fn apply(t: Tenant<'_>) -> Result<Action, Error> {
    let mut s = State::new(t);
    for step in STEPS {
        let started = Instant::now();
        match step.apply(&mut s).await? {
            Flow::Next => s.t.ctx.time(step.name(), started.elapsed()),
            Flow::Refuse(c) => return refuse(&s.t, c).await,
            Flow::Done(action) => return Ok(action),
        }
    }
    Ok(Action::requeue(s.requeue))
}

/// Runs every step's clean-up in reverse order; a failure stops there and the finalizer
/// retries (each clean-up is idempotent).
pub async fn cleanup(t: Tenant<'_>) -> Result<Action, Error> {
    // The tenant's WorkerPools go first, while its API still answers: their machines are
    // drained and wiped before the control plane they joined disappears.
    let ns = t.tcp.namespace().unwrap_or_default();
    if crate::machines::pool::delete_pools_of(&t.ctx.client, &ns, &t.name).await? > 0 {
        return Err(Error::NotYet(
            "the tenant's WorkerPools to release their machines",
        ));
    }
    for step in STEPS.iter().rev() {
        if let Some(work) = step.cleanup(&t) {
            let started = Instant::now();
            work.await?;
            t.ctx
                .time(&format!("cleanup-{}", step.name()), started.elapsed());
        }
    }
    Ok(Action::await_change())
}

/// Records a refusal: phase NotReady, the condition and a Warning Event, nothing else
/// changed (the status is the one the reconcile started from).
async fn refuse(t: &Tenant<'_>, c: Condition) -> Result<Action, Error> {
    tracing::warn!(tenant = %t.name, reason = %c.reason, "{}", c.message);
    k::warn(
        &t.ctx.recorder,
        &t.tcp.object_ref(&()),
        "Reconcile",
        &c.reason,
        &c.message,
    )
    .await;
    let mut status = t.tcp.status.clone().unwrap_or_default();
    status.conditions = k::merge_conditions(&status.conditions, vec![c]);
    if status.phase != TenantControlPlanePhase::Ready {
        status.phase = TenantControlPlanePhase::NotReady;
    }
    status.observed_generation = t.generation();
    t.patch_status(&status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}
