//! Tunnel credentials. konnectivity-server authenticates agents with ServiceAccount tokens
//! (a TokenReview: audience [`AGENT_AUDIENCE`], user `kube-system/`[`AGENT_SERVICE_ACCOUNT`]).
//! tether-agent runs on the host, not in a pod, so nothing projects it a token: the pool
//! controller mints one per Machine with TokenRequest and puts it in that Machine's join.
//! Each token is bound to an anchor Secret `kube-system/tether-tunnel-<machine>` in the
//! tenant: deleting the anchor — when the machine is released, and by [`sweep`] for any
//! machine no pool of the tenant holds any more (deleted Machines, pools deleted while the
//! tenant was unreachable, konnectivity turned off) — makes the server refuse its tokens
//! from then on. Otherwise a token lives [`LIFETIME_SECONDS`] and the next one is minted when
//! less than [`RENEW_BEFORE`] is left. konnectivity checks the token only when a stream
//! opens: a renewed token is used at the agent's next connect, and a revoked one ends
//! nothing already open (the agent closes its streams when its join goes away). Why
//! tokens rather than mTLS: docs/decisions.md "The tunnel".

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::bootstrap_tokens::MACHINE_LABEL;
use crate::controlplane::render::{AGENT_AUDIENCE, AGENT_SERVICE_ACCOUNT};
use crate::error::Error;

/// How long a tunnel token is valid.
pub const LIFETIME_SECONDS: i64 = 3600;
/// A token with less life left than this is replaced.
pub const RENEW_BEFORE: time::Duration = time::Duration::minutes(30);

/// The anchor Secret of `machine`'s tunnel tokens.
pub fn anchor_name(machine: &str) -> String {
    format!("tether-tunnel-{machine}")
}

/// A token as handed out.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The JWT.
    pub token: String,
    /// When it stops working (RFC 3339, as the API server said).
    pub expires: String,
    /// The UID of the anchor it is bound to.
    pub anchor_uid: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("token", &"<redacted>")
            .field("expires", &self.expires)
            .field("anchor_uid", &self.anchor_uid)
            .finish()
    }
}

impl Issued {
    /// Whether it can stay in the join at `now`: bound to the anchor as it is, with enough
    /// life left.
    pub fn reusable(&self, anchor_uid: &str, now: OffsetDateTime) -> bool {
        self.anchor_uid == anchor_uid
            && OffsetDateTime::parse(&self.expires, &Rfc3339).is_ok_and(|e| e - now > RENEW_BEFORE)
    }
}

/// The UID of `machine`'s anchor, made if missing.
pub async fn anchor(tenant: &kube::Client, machine: &str) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(tenant.clone(), "kube-system");
    let name = anchor_name(machine);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(Error::kube(format!("read {name}")))?;
    let secret = match existing {
        Some(s) => s,
        None => {
            let s: Secret = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {
                    "name": name, "namespace": "kube-system",
                    "labels": {MACHINE_LABEL: machine},
                    "annotations": {"tether.dev/purpose": "Machine's konnectivity tokens are bound to this Secret: deleting it revokes them"},
                },
            }))
            .expect("a valid Secret");
            api.create(&PostParams::default(), &s)
                .await
                .map_err(Error::kube(format!("create {name}")))?
        }
    };
    secret
        .metadata
        .uid
        .ok_or_else(|| Error::Invalid(format!("{name} has no UID")))
}

/// A new token for `machine`, bound to its anchor.
pub async fn mint(tenant: &kube::Client, machine: &str, anchor_uid: &str) -> Result<Issued, Error> {
    let api: Api<ServiceAccount> = Api::namespaced(tenant.clone(), "kube-system");
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {
            "audiences": [AGENT_AUDIENCE],
            "expirationSeconds": LIFETIME_SECONDS,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": anchor_name(machine), "uid": anchor_uid},
        },
    }))
    .expect("a valid TokenRequest");
    let out = api
        .create_token_request(AGENT_SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await
        .map_err(Error::kube(format!("mint a tunnel token for {machine}")))?;
    let status = serde_json::to_value(&out.status).unwrap_or_default();
    let token = status["token"].as_str().unwrap_or_default().to_string();
    let expires = status["expirationTimestamp"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if token.is_empty() || expires.is_empty() {
        return Err(Error::Invalid(format!(
            "the tenant returned an empty tunnel token for {machine}"
        )));
    }
    tracing::info!(machine, expires, "tunnel token minted");
    Ok(Issued {
        token,
        expires,
        anchor_uid: anchor_uid.into(),
    })
}

/// Revokes the tokens of every machine with an anchor in the tenant that is not in `keep`.
pub async fn sweep(
    tenant: &kube::Client,
    keep: &std::collections::BTreeSet<String>,
) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(tenant.clone(), "kube-system");
    let anchors = api
        .list(&kube::api::ListParams::default().labels(MACHINE_LABEL))
        .await
        .map_err(Error::kube("list the tenant's tunnel anchors"))?;
    for s in anchors.items {
        let name = s.metadata.name.clone().unwrap_or_default();
        let machine = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MACHINE_LABEL));
        if let Some(machine) = machine
            && name == anchor_name(machine)
            && !keep.contains(machine)
        {
            revoke(tenant, machine).await?;
        }
    }
    Ok(())
}

/// Revokes every tunnel token of `machine` (deletes the anchor).
pub async fn revoke(tenant: &kube::Client, machine: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(tenant.clone(), "kube-system");
    let name = anchor_name(machine);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(machine, "tunnel tokens revoked");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete {name}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_kept_while_bound_to_the_anchor_with_half_its_life() {
        let now = OffsetDateTime::parse("2026-11-30T10:00:00Z", &Rfc3339).unwrap();
        let issued = |expires: &str| Issued {
            token: "t".into(),
            expires: expires.into(),
            anchor_uid: "u1".into(),
        };
        for (expires, anchor, want) in [
            ("2026-11-30T11:00:00Z", "u1", true),
            ("2026-11-30T10:31:00Z", "u1", true),
            ("2026-11-30T10:30:00Z", "u1", false),
            ("2026-11-30T09:00:00Z", "u1", false),
            ("2026-11-30T11:00:00Z", "u2", false),
            ("not a time", "u1", false),
        ] {
            assert_eq!(
                issued(expires).reusable(anchor, now),
                want,
                "{expires} {anchor}"
            );
        }
    }
}
