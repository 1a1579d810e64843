//! Kubelet bootstrap tokens, one per Machine and join (DESIGN.md "Machines, identities and
//! tokens"): minted in the tenant's `kube-system` as standard `bootstrap.kubernetes.io/token`
//! Secrets, labelled with the Machine they were minted for (which is how the CSR approver
//! knows whose token a request came with), valid one hour, in the group
//! `system:bootstrappers:tether:<pool>`, and deleted once the kubelet holds its client
//! certificate. The controller-manager's tokencleaner removes any that expire first.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::controlplane::bootstrap::BootstrapToken;
use crate::error::Error;

/// Label naming the Machine a token was minted for.
pub const MACHINE_LABEL: &str = "tether.dev/machine";
/// How long a token is valid.
pub const LIFETIME: time::Duration = time::Duration::hours(1);
/// A token with less life left than this is replaced (a join takes seconds to minutes).
pub const MIN_LEFT: time::Duration = time::Duration::minutes(15);

/// A token minted for a Machine, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// The token.
    pub token: BootstrapToken,
    /// Its Machine.
    pub machine: String,
    /// When it stops working.
    pub expires: OffsetDateTime,
}

impl Minted {
    /// Whether it is still worth handing out at `now`.
    pub fn usable(&self, now: OffsetDateTime) -> bool {
        self.expires - now > MIN_LEFT
    }
}

/// The Secret of a token minted for `machine` of pool `pool`.
pub fn secret(
    token: &BootstrapToken,
    machine: &str,
    pool: &str,
    expires: OffsetDateTime,
) -> Secret {
    let v = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "bootstrap.kubernetes.io/token",
        "metadata": {
            "name": format!("bootstrap-token-{}", token.id),
            "namespace": "kube-system",
            "labels": {MACHINE_LABEL: machine},
        },
        "stringData": {
            "token-id": token.id,
            "token-secret": token.secret,
            "expiration": expires.format(&Rfc3339).unwrap_or_default(),
            "usage-bootstrap-authentication": "true",
            "auth-extra-groups": format!("system:bootstrappers:tether:{pool}"),
            "description": format!("tether: joins Machine {machine}"),
        },
    });
    serde_json::from_value(v).expect("a valid Secret")
}

/// A minted token from its Secret (None for anything else).
pub fn parse(s: &Secret) -> Option<Minted> {
    let machine = s.labels().get(MACHINE_LABEL)?.clone();
    let data = s.data.as_ref()?;
    let get = |k: &str| {
        data.get(k)
            .map(|v| String::from_utf8_lossy(&v.0).to_string())
    };
    let token = BootstrapToken::parse(&format!("{}.{}", get("token-id")?, get("token-secret")?))?;
    let expires = OffsetDateTime::parse(&get("expiration")?, &Rfc3339).ok()?;
    Some(Minted {
        token,
        machine,
        expires,
    })
}

/// Every token minted by Tether in the tenant.
pub async fn list(tenant: &kube::Client) -> Result<Vec<Minted>, Error> {
    let api: Api<Secret> = Api::namespaced(tenant.clone(), "kube-system");
    let lp = ListParams::default().labels(MACHINE_LABEL);
    Ok(api
        .list(&lp)
        .await
        .map_err(Error::kube("list the tenant's bootstrap tokens"))?
        .items
        .iter()
        .filter_map(parse)
        .collect())
}

/// Mints a new token for `machine`.
pub async fn mint(tenant: &kube::Client, machine: &str, pool: &str) -> Result<Minted, Error> {
    let api: Api<Secret> = Api::namespaced(tenant.clone(), "kube-system");
    let token = BootstrapToken::generate()?;
    let expires = OffsetDateTime::now_utc() + LIFETIME;
    api.create(
        &PostParams::default(),
        &secret(&token, machine, pool, expires),
    )
    .await
    .map_err(Error::kube(format!(
        "create a bootstrap token for {machine}"
    )))?;
    tracing::info!(machine, id = %token.id, "bootstrap token minted");
    Ok(Minted {
        token,
        machine: machine.into(),
        expires,
    })
}

/// Deletes the tokens of `machine` among `minted`.
pub async fn delete(tenant: &kube::Client, minted: &[Minted], machine: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(tenant.clone(), "kube-system");
    for m in minted.iter().filter(|m| m.machine == machine) {
        let name = format!("bootstrap-token-{}", m.token.id);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(machine, id = %m.token.id, "bootstrap token deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::kube(format!("delete {name}"))(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn a_minted_token_reads_back_and_ages() {
        let t = BootstrapToken::parse("abcdef.0123456789abcdef").unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let mut s = secret(&t, "m1", "workers", now + LIFETIME);
        // What the API server returns: `data`, not `stringData`.
        s.data = Some(
            s.string_data
                .take()
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        );
        let data = s.data.as_ref().unwrap();
        assert_eq!(
            data["auth-extra-groups"].0,
            b"system:bootstrappers:tether:workers"
        );
        assert!(!data.contains_key("usage-bootstrap-signing"));
        let m = parse(&s).unwrap();
        assert_eq!(m.token, t);
        assert_eq!(m.machine, "m1");
        assert!(m.usable(now));
        assert!(m.usable(now + time::Duration::minutes(44)));
        assert!(!m.usable(now + time::Duration::minutes(46)));
        s.labels_mut().clear();
        assert_eq!(parse(&s), None, "not Tether's");
    }
}
