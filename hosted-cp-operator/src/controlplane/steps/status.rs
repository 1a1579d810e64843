//! The TenantControlPlane's status: phase Ready with every condition, the version that
//! runs, the endpoint, the CA pin and the admin kubeconfig Secret once everything above
//! succeeded; phase Deleting first thing on deletion.

use std::time::Duration;

use futures::future::BoxFuture;
use tether_api::{Condition, TenantControlPlanePhase};
use time::OffsetDateTime;

use super::kubeconfigs::admin_secret;
use crate::controlplane::pipeline::{Flow, State, Step, Tenant, need};
use crate::controlplane::pki;
use crate::error::Error;
use crate::kube::{condition, merge_conditions};

/// The status.
pub struct Status;

impl Step for Status {
    fn name(&self) -> &'static str {
        "status"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(ready(s))
    }

    fn cleanup<'a>(&'a self, t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        Some(Box::pin(deleting(t)))
    }
}

async fn ready(s: &mut State<'_>) -> Result<Flow, Error> {
    let conditions = conditions(s)?;
    let version = need(&s.version, "version-gate")?;
    let pki = need(&s.pki, "pki")?;
    let status = &mut s.status;
    status.conditions = merge_conditions(&status.conditions, conditions);
    status.phase = TenantControlPlanePhase::Ready;
    status.version = Some(version.run.clone());
    let placement = need(&s.placement, "placement")?;
    status.endpoint = Some(placement.endpoint.clone());
    status.konnectivity_endpoint = placement.konnectivity_endpoint.clone();
    status.ca_hash = Some(pki.ca_hash.clone());
    status.kubeconfig_secret = Some(admin_secret(&s.t.name));
    status.observed_generation = s.t.generation();
    if pki.rotation_status.is_some() {
        status.ca_rotation = pki.rotation_status.clone();
    }
    s.t.patch_status(status).await?;
    // Look again by the time the first leaf is due for renewal, and at least every 10 s.
    let renew =
        pki::renew_in(&pki.files, OffsetDateTime::now_utc()).unwrap_or(Duration::from_secs(3600));
    s.requeue = renew.min(Duration::from_secs(10));
    Ok(Flow::Next)
}

/// Every condition of a Ready tenant.
fn conditions(s: &State<'_>) -> Result<Vec<Condition>, Error> {
    let generation = s.t.generation();
    let datastore = &need(&s.datastore, "datastore-lookup")?.name;
    let version = match &need(&s.version, "version-gate")?.refused {
        Some(msg) => condition(
            "VersionAccepted",
            false,
            "UpgradeRefused",
            msg.clone(),
            generation,
        ),
        None => condition("VersionAccepted", true, "Accepted", "", generation),
    };
    Ok(vec![
        condition("SpecValid", true, "Valid", "", generation),
        condition("CertificatesReady", true, "Issued", "", generation),
        condition(
            "DataStoreReady",
            true,
            "Provisioned",
            format!("on DataStore {datastore}"),
            generation,
        ),
        condition("ControlPlaneAvailable", true, "ReadyzOk", "", generation),
        condition("TenantBootstrapped", true, "Applied", "", generation),
        version,
    ])
}

/// Phase Deleting, so users see the teardown (best effort: the object is going anyway).
async fn deleting(t: &Tenant<'_>) -> Result<(), Error> {
    let mut status = t.tcp.status.clone().unwrap_or_default();
    if status.phase != TenantControlPlanePhase::Deleting {
        status.phase = TenantControlPlanePhase::Deleting;
        let _ = t.patch_status(&status).await;
    }
    Ok(())
}
