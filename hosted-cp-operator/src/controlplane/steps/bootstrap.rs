//! What the tenant cluster itself needs before nodes join (`cluster-info`, bootstrap-token
//! RBAC, konnectivity RBAC, the add-ons), applied into the tenant, and the bootstrap token
//! it carries, kept in the management cluster as `<name>-bootstrap-token`.

use futures::future::BoxFuture;
use tether_api::TenantControlPlanePhase;
use time::OffsetDateTime;

use crate::controlplane::addons;
use crate::controlplane::bootstrap::{self, BootstrapToken};
use crate::controlplane::pipeline::{Flow, State, Step, Tenant, need};
use crate::controlplane::pki::Rotation;
use crate::error::Error;
use crate::kube::{Files, apply_objects};

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
    let token = token(&s.t).await?;
    let expiration = (OffsetDateTime::now_utc() + time::Duration::days(365))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut objects =
        bootstrap::objects(endpoint, &pki.files["client-ca.crt"], &token, &expiration);
    objects.extend(addons::objects(&s.t.tcp.spec, &version.run, endpoint));
    // Applied only when something changed: the token's expiration is set once, and
    // re-applying it on every reconcile would churn the object.
    let status = &s.status;
    let changed = status.phase != TenantControlPlanePhase::Ready
        || status.observed_generation != s.t.generation()
        || pki.rotation != Rotation::Keep
        || version.upgrading
        || status.endpoint.as_deref() != Some(endpoint);
    if changed {
        apply_objects(tenant, &objects).await?;
    }
    Ok(Flow::Next)
}

/// The tenant's bootstrap token: the stored one, or a new one stored now.
async fn token(t: &Tenant<'_>) -> Result<BootstrapToken, Error> {
    let name = token_secret(&t.name);
    let stored = t.read_secret(&name).await?;
    let parsed = stored
        .get("token")
        .and_then(|v| BootstrapToken::parse(&String::from_utf8_lossy(v)));
    if let Some(token) = parsed {
        return Ok(token);
    }
    let token = BootstrapToken::generate()?;
    let files = Files::from([("token".to_string(), token.token().into_bytes())]);
    t.apply_secret(&name, &files).await?;
    Ok(token)
}
