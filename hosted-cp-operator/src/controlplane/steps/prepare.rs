//! The steps that decide before anything is made: is the spec acceptable, which DataStore,
//! which version, where the tenant listens. They own no object, so they have no clean-up.

use futures::future::BoxFuture;
use kube::api::Api;
use tether_api::DataStore;
use tether_api::tenant_control_plane::{self as tcpmod, KubeVersion};

use super::datastore::{Chosen, admin};
use crate::controlplane::pipeline::{Flow, State, Step};
use crate::error::Error;
use crate::kube::condition;

/// Refuses a spec that cannot work before anything is created.
pub struct Validate;

impl Step for Validate {
    fn name(&self) -> &'static str {
        "validate"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(async move {
            let known: Vec<&str> = s.t.ctx.known_versions.iter().map(String::as_str).collect();
            let problems = tcpmod::validate(&s.t.tcp.spec, &known);
            if problems.is_empty() {
                return Ok(Flow::Next);
            }
            let msg = problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            Ok(Flow::Refuse(condition(
                "SpecValid",
                false,
                "InvalidSpec",
                msg,
                s.t.generation(),
            )))
        })
    }
}

/// Finds the tenant's DataStore (fixed once chosen) and its credentials: an unusable
/// DataStore is refused like a missing one, with no partial objects.
pub struct DataStoreLookup;

impl Step for DataStoreLookup {
    fn name(&self) -> &'static str {
        "datastore-lookup"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(async move {
            let name = s.t.datastore_name();
            let refuse = |reason: &str, message: String| {
                Flow::Refuse(condition(
                    "DataStoreReady",
                    false,
                    reason,
                    message,
                    s.t.generation(),
                ))
            };
            let api: Api<DataStore> = Api::all(s.t.ctx.client.clone());
            let Some(ds) = api
                .get_opt(&name)
                .await
                .map_err(Error::kube(format!("get DataStore {name}")))?
            else {
                let msg = format!("DataStore {name} does not exist");
                return Ok(refuse("DataStoreNotFound", msg));
            };
            match admin(s.t.ctx, &ds).await {
                Ok(admin) => {
                    s.datastore = Some(Chosen { name, admin });
                    Ok(Flow::Next)
                }
                Err(e) => Ok(refuse("DataStoreUnusable", e.to_string())),
            }
        })
    }
}

/// The version to run: the spec's, unless that would skip a minor or go back, in which case
/// what runs keeps running and the refusal shows in a condition.
#[derive(Debug, Clone)]
pub struct Version {
    /// What the components run.
    pub run: String,
    /// Why the spec's version is not run, if it is not.
    pub refused: Option<String>,
    /// Whether `run` differs from what ran before.
    pub upgrading: bool,
}

/// Decides [`Version`].
pub struct VersionGate;

impl Step for VersionGate {
    fn name(&self) -> &'static str {
        "version-gate"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(async move {
            let spec_version = &s.t.tcp.spec.kubernetes.version;
            let desired = KubeVersion::parse(spec_version).map_err(Error::Invalid)?;
            let mut refused = None;
            let run = match s.status.version.as_deref().map(KubeVersion::parse) {
                Some(Ok(current)) => match tcpmod::check_upgrade(&current, &desired) {
                    Ok(()) => spec_version.clone(),
                    Err(msg) => {
                        refused = Some(msg);
                        current.to_string()
                    }
                },
                _ => spec_version.clone(),
            };
            let upgrading = s.status.version.as_deref().is_some_and(|v| v != run);
            s.version = Some(Version {
                run,
                refused,
                upgrading,
            });
            Ok(Flow::Next)
        })
    }
}

/// Ports, addresses and endpoint, from the runtime.
pub struct Place;

impl Step for Place {
    fn name(&self) -> &'static str {
        "placement"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(async move {
            let t = &s.t;
            s.placement = Some(t.ctx.runtime.placement(&t.ns, &t.name, &t.tcp.spec)?);
            Ok(Flow::Next)
        })
    }
}
