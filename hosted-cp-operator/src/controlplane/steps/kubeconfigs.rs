//! The kubeconfig Secrets: `<name>-kubeconfigs` for the components (loopback server) and
//! `<name>-admin-kubeconfig` for users (the external endpoint) — apart, because the admin one
//! is handed out and the others never are.

use futures::future::BoxFuture;
use time::OffsetDateTime;

use crate::controlplane::kubeconfig::{self, ADMIN};
use crate::controlplane::pipeline::{Flow, State, Step, Tenant, need};
use crate::error::Error;
use crate::kube::Files;

/// The name of tenant `name`'s admin kubeconfig Secret (reported in status).
pub fn admin_secret(name: &str) -> String {
    format!("{name}-admin-kubeconfig")
}

/// Both kubeconfig Secrets.
pub struct KubeconfigSecrets;

impl Step for KubeconfigSecrets {
    fn name(&self) -> &'static str {
        "kubeconfigs"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(ensure(s))
    }

    fn cleanup<'a>(&'a self, t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        Some(Box::pin(async move {
            t.delete_secret(&t.names().kubeconfigs).await?;
            t.delete_secret(&admin_secret(&t.name)).await
        }))
    }
}

async fn ensure(s: &mut State<'_>) -> Result<Flow, Error> {
    let placement = need(&s.placement, "placement")?;
    let pki = need(&s.pki, "pki")?;
    let t = &s.t;
    let (components_secret, admin_secret) = (t.names().kubeconfigs, admin_secret(&t.name));
    let mut existing = t.read_secret(&components_secret).await?;
    existing.extend(t.read_secret(&admin_secret).await?);
    let (kcs, changed) = kubeconfig::ensure(
        &t.name,
        &pki.files,
        &format!("https://127.0.0.1:{}", placement.ports.api),
        &placement.endpoint,
        &existing,
        OffsetDateTime::now_utc(),
    )?;
    if changed {
        let (admin, rest): (Files, Files) = kcs
            .clone()
            .into_iter()
            .partition(|(k, _)| k.as_str() == ADMIN);
        t.apply_secret(&components_secret, &rest).await?;
        t.apply_secret(&admin_secret, &admin).await?;
    }
    s.kubeconfigs = Some(kcs);
    Ok(Flow::Next)
}
