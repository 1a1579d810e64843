//! What the tenant cluster itself needs before nodes join (`cluster-info`, bootstrap-token
//! RBAC, konnectivity RBAC, the add-ons), applied into the tenant. What older versions made
//! and Tether no longer grants — the tenant-wide join token (`<name>-bootstrap-token` in the
//! management cluster, `bootstrap-token-<id>` in the tenant) and the blanket `nodeclient`
//! approval — is deleted here.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, DeleteParams};
use tether_api::TenantControlPlanePhase;

use crate::controlplane::addons;
use crate::controlplane::bootstrap::{self, BootstrapToken};
use crate::controlplane::pipeline::{Flow, State, Step, Tenant, need};
use crate::controlplane::pki::Rotation;
use crate::error::Error;
use crate::kube::apply_objects;

/// The tenant's bootstrap objects and token.
pub struct TenantBootstrap;

impl Step for TenantBootstrap {
    fn name(&self) -> &'static str {
        "bootstrap"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(ensure(s))
    }

    fn cleanup<'a>(&'a self, t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        Some(Box::pin(async move {
            t.delete_secret(&token_secret(&t.name)).await
        }))
    }
}

fn token_secret(name: &str) -> String {
    format!("{name}-bootstrap-token")
}

async fn ensure(s: &mut State<'_>) -> Result<Flow, Error> {
    let endpoint = &need(&s.placement, "placement")?.endpoint;
    let pki = need(&s.pki, "pki")?;
    let version = need(&s.version, "version-gate")?;
    let tenant = need(&s.tenant_client, "readyz")?;
    retire(&s.t, tenant).await?;
    let mut objects = bootstrap::objects(endpoint, &pki.files["client-ca.crt"]);
    objects.extend(addons::objects(&s.t.tcp.spec, &version.run, endpoint));
    // Applied only when something changed: re-applying on every reconcile would churn the
    // objects for nothing.
    let status = &s.status;
    let changed = status.phase != TenantControlPlanePhase::Ready
        || status.observed_generation != s.t.generation()
        || pki.rotation != Rotation::Keep
        || version.upgrading
        || status.endpoint.as_deref() != Some(endpoint);
    if changed {
        apply_objects(tenant, &objects).await?;
        // The blanket node-client approval of earlier versions, wherever it still is.
        let crbs: Api<ClusterRoleBinding> = Api::all(tenant.clone());
        match crbs
            .delete(bootstrap::RETIRED, &DeleteParams::default())
            .await
        {
            Ok(_) => tracing::info!(tenant = %s.t.name, "deleted {}", bootstrap::RETIRED),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::kube(format!("delete {}", bootstrap::RETIRED))(e)),
        }
    }
    Ok(Flow::Next)
}

/// Deletes the tenant-wide join token of older versions.
async fn retire(t: &Tenant<'_>, tenant: &kube::Client) -> Result<(), Error> {
    let name = token_secret(&t.name);
    let stored = t.read_secret(&name).await?;
    if stored.is_empty() {
        return Ok(());
    }
    let gone = |r: Result<_, kube::Error>, what: String| match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(what)(e)),
    };
    if let Some(token) = stored
        .get("token")
        .and_then(|v| BootstrapToken::parse(&String::from_utf8_lossy(v)))
    {
        let secrets: Api<Secret> = Api::namespaced(tenant.clone(), "kube-system");
        let tname = format!("bootstrap-token-{}", token.id);
        gone(
            secrets
                .delete(&tname, &DeleteParams::default())
                .await
                .map(drop),
            format!("delete {tname}"),
        )?;
    }
    t.delete_secret(&name).await?;
    tracing::info!(tenant = %t.name, "retired the tenant-wide join token");
    Ok(())
}
