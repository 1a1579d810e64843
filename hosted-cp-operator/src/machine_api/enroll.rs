//! `POST /v1/enroll`: token + CSR + facts → machine certificate.
//!
//! The order is what makes "a refusal creates nothing", "a power cut never strands a machine"
//! and "deleting a Machine revokes it" hold together:
//! 1. [`check`]: rate limit, body, token syntax, CSR (its signature proves the sender holds
//!    the key), boot MAC, UUID — any failure is a refusal, nothing is read or written;
//! 2. [`Server::spend_token`], under an in-process lock per token: the token's record is
//!    admitted ([`TokenRecord::admit`]); for a new enrollment the Machine is chosen
//!    (existing by MAC, or by UUID if never enrolled, else `mac-<hex>`), checked against
//!    the token ([`may_bind`]: nobody takes over an enrolled or pooled Machine with a
//!    token not meant for it), created if missing, and only then the token is spent for
//!    this key by compare-and-swap on its Secret. A refusal after the Machine was created
//!    here deletes it again. A replay (the same key again) gets the Machine the token
//!    enrolled — and is refused if that Machine was deleted since;
//! 3. [`Server::record`]: the certificate (the one on record if it is for this key, else a
//!    new one) is recorded by compare-and-swap on the Machine, so two retries racing cannot
//!    leave the node holding a certificate that is not on record.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Resource, ResourceExt};
use tether_api::Machine;
use tether_api::machine::{Facts, MachineCertificate};
use tether_api::machine_api::{CONFIG_MAP, EnrollRequest, EnrollResponse, Reason};
use tether_api::token::{Admission, Refusal, TokenRecord};
use tether_boot::{Mac, Token, Uuid};
use time::OffsetDateTime;

use super::Server;
use super::http::{Failure, read_json};
use super::inventory::{Inventory, Written, may_bind};
use crate::kube::rfc3339;
use crate::x509::Csr;

/// How long enrollments may keep retrying a compare-and-swap on one token's record against
/// other operator replicas; after each conflict, a jittered pause.
const CAS_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);
/// Compare-and-swap attempts on a Machine's certificate record.
const RECORD_ATTEMPTS: usize = 8;

/// What [`check`] accepted.
pub struct Checked {
    token: Token,
    csr: Csr,
    mac: Mac,
    /// The node's UUID, unless it is a firmware placeholder (no identity).
    uuid: Option<Uuid>,
}

/// The handler.
pub async fn handle(
    State(server): State<Arc<Server>>,
    body: Body,
) -> Result<Json<EnrollResponse>, Failure> {
    if let Err(wait) = server.admit_enrollment() {
        return Err(Failure::new(
            Reason::RateLimited,
            format!(
                "too many enrollments; retry in {} ms",
                wait.as_millis().max(1)
            ),
        ));
    }
    let req: EnrollRequest = read_json(body).await?;
    let c = check(&server, &req).await?;
    let machine = server.spend_token(&c, &req.facts).await?;
    let cert = server
        .record(&machine.name_any(), &c.csr, &req.facts)
        .await?;
    tracing::info!(machine = %machine.name_any(), mac = %c.mac, token = c.token.id(), "enrolled");
    Ok(Json(EnrollResponse {
        machine: machine.name_any(),
        certificate: cert.pem,
        ca: server.ca.cert_pem.clone(),
    }))
}

/// Everything about a request that can be judged without the cluster.
async fn check(server: &Server, req: &EnrollRequest) -> Result<Checked, Failure> {
    let token: Token = match req.token.parse() {
        Ok(t) => t,
        Err(e) => {
            return Err(server
                .refuse(None, Reason::TokenMalformed, e.to_string())
                .await);
        }
    };
    let csr = Csr::parse(&req.csr).map_err(|e| Failure::new(Reason::BadRequest, e))?;
    let bad = |e: tether_boot::Error| Failure::new(Reason::BadRequest, e.to_string());
    let mac: Mac = req
        .facts
        .boot_mac
        .as_deref()
        .ok_or_else(|| Failure::new(Reason::BadRequest, "facts.bootMac is required"))?
        .parse()
        .map_err(bad)?;
    let uuid = match &req.facts.uuid {
        Some(u) => Some(u.parse::<Uuid>().map_err(bad)?).filter(|u| !u.is_placeholder()),
        None => None,
    };
    Ok(Checked {
        token,
        csr,
        mac,
        uuid,
    })
}

impl Server {
    /// Admits the token for this node and returns the Machine it is; for a new enrollment,
    /// makes sure the Machine exists and spends the token for this key (see the module
    /// documentation for the order). Spends of one token are serialised in this process (a
    /// pool token that hundreds of machines spend at once would otherwise mostly collide).
    async fn spend_token(&self, c: &Checked, facts: &Facts) -> Result<Machine, Failure> {
        let lock = self.spend_lock(c.token.id());
        let _held = lock.lock().await;
        let inventory = Inventory::new(self.client.clone());
        let deadline = std::time::Instant::now() + CAS_BUDGET;
        let mut conflicts = 0u32;
        // A Machine this attempt created: removed again if the enrollment is refused.
        let mut created: Option<Machine> = None;
        let result = loop {
            if std::time::Instant::now() >= deadline {
                break Err(Failure::new(
                    Reason::Internal,
                    "the token record kept changing; retry",
                ));
            }
            let loaded = match self.tokens.get(c.token.id()).await {
                Ok(Some(l)) => l,
                Ok(None) | Err(crate::error::Error::Invalid(_)) => {
                    let msg = format!(
                        "token {} is unknown or its secret does not match",
                        c.token.id()
                    );
                    break Err(self.refuse(None, Reason::TokenInvalid, msg).await);
                }
                Err(e) => break Err(Failure::internal(e)),
            };
            let regarding = loaded.secret.object_ref(&());
            let now = OffsetDateTime::now_utc();
            match loaded
                .record
                .admit(&c.token, now, Some(c.mac), &c.csr.key_sha256)
            {
                Err(r) => {
                    let (reason, msg) = refusal(&r, &loaded.record, c.mac);
                    break Err(self.refuse(Some(regarding), reason, msg).await);
                }
                Ok(Admission::Replay { machine }) => {
                    break match inventory.get(&machine).await.map_err(Failure::internal)? {
                        Some(m) => Ok(m),
                        None => {
                            let msg = format!(
                                "token {} enrolled Machine {machine}, which was deleted since: deleting a Machine revokes it; enroll with a new token",
                                c.token.id()
                            );
                            Err(self.refuse(Some(regarding), Reason::TokenUsedUp, msg).await)
                        }
                    };
                }
                Ok(Admission::Spend) => {}
            }
            let name = inventory
                .bind(c.mac, c.uuid.as_ref())
                .await
                .map_err(Failure::internal)?;
            let machine = match inventory.get(&name).await.map_err(Failure::internal)? {
                Some(m) => {
                    if let Err(msg) = may_bind(&m, &loaded.record) {
                        break Err(self
                            .refuse(Some(regarding), Reason::MachineClaimed, msg)
                            .await);
                    }
                    m
                }
                None => match inventory
                    .create(&name, c.mac, c.uuid.as_ref(), facts, &loaded.record)
                    .await
                    .map_err(Failure::internal)?
                {
                    Some(m) => {
                        created = Some(m.clone());
                        m
                    }
                    // Made by someone else a moment ago: decide again with it in sight.
                    None => continue,
                },
            };
            let mut spent = loaded.record.clone();
            spent.spend(&c.csr.key_sha256, &name);
            if self
                .tokens
                .replace(&loaded, &spent)
                .await
                .map_err(Failure::internal)?
            {
                tracing::info!(token = c.token.id(), machine = %name, mac = %c.mac, "token spent");
                inventory
                    .adopt(&machine, &spent)
                    .await
                    .map_err(Failure::internal)?;
                created = None;
                break Ok(machine);
            }
            // Another replica spent or changed it meanwhile: decide again, after a pause.
            conflicts += 1;
            tokio::time::sleep(cas_pause(conflicts)).await;
        };
        if let Some(m) = created {
            inventory.undo_create(&m).await;
        }
        result
    }

    /// Records the certificate for `csr` on Machine `name` by compare-and-swap (a retry
    /// racing the first request converges on one certificate) and returns it.
    async fn record(
        &self,
        name: &str,
        csr: &Csr,
        facts: &Facts,
    ) -> Result<MachineCertificate, Failure> {
        let inventory = Inventory::new(self.client.clone());
        for _ in 0..RECORD_ATTEMPTS {
            let now = OffsetDateTime::now_utc();
            let m = inventory
                .get(name)
                .await
                .map_err(Failure::internal)?
                .ok_or_else(|| {
                    Failure::new(
                        Reason::Forbidden,
                        format!("Machine {name} was deleted while enrolling"),
                    )
                })?;
            let cert = self
                .certificate_for(&m, csr, now)
                .map_err(Failure::internal)?;
            if inventory
                .record_enrollment(&m, facts, &cert, now)
                .await
                .map_err(Failure::internal)?
                == Written::Yes
            {
                return Ok(cert);
            }
        }
        Err(Failure::new(
            Reason::Internal,
            format!("Machine {name} kept changing; retry"),
        ))
    }

    /// The in-process lock serialising spends of token `id`.
    fn spend_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.spend_locks.lock().unwrap_or_else(|e| e.into_inner());
        // Drop locks nobody holds or waits for, so the map stays as small as the storm.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_string()).or_default().clone()
    }

    /// The certificate for `csr` on `m`: the one on record if it is for this key (a retry),
    /// else a new one that replaces it (the old one stays accepted until the new one is used).
    pub(super) fn certificate_for(
        &self,
        m: &Machine,
        csr: &Csr,
        now: OffsetDateTime,
    ) -> Result<MachineCertificate, crate::error::Error> {
        let current = m.status.as_ref().and_then(|s| s.certificate.clone());
        if let Some(c) = &current
            && c.key_sha256 == csr.key_sha256
        {
            return Ok(c.clone());
        }
        let issued = self
            .ca
            .sign(csr, &m.name_any(), self.settings.cert_lifetime, now)?;
        Ok(MachineCertificate {
            sha256: issued.sha256,
            key_sha256: csr.key_sha256.clone(),
            pem: issued.pem,
            not_after: rfc3339(issued.not_after),
            previous_sha256: current.map(|c| c.sha256),
        })
    }

    /// Logs a refusal, publishes a Warning Event (on the token's Secret, else on the API's
    /// ConfigMap), and returns it as the answer.
    pub(super) async fn refuse(
        &self,
        regarding: Option<ObjectReference>,
        reason: Reason,
        message: String,
    ) -> Failure {
        tracing::warn!(?reason, "enrollment refused: {message}");
        let regarding = regarding.unwrap_or_else(|| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some(CONFIG_MAP.into()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        });
        crate::kube::warn(
            &self.recorder,
            &regarding,
            "Enroll",
            &format!("{reason:?}"),
            &message,
        )
        .await;
        Failure::new(reason, message)
    }
}

/// 5–50 ms, more for repeated conflicts, jittered so contenders do not retry in step.
fn cas_pause(conflicts: u32) -> std::time::Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let ceiling = 5 + 5 * u64::from(conflicts.min(9));
    std::time::Duration::from_millis(5 + u64::from(nanos) % ceiling)
}

/// The reason and message of a token refusal.
fn refusal(r: &Refusal, record: &TokenRecord, mac: Mac) -> (Reason, String) {
    let id = &record.id;
    match r {
        Refusal::Invalid => (
            Reason::TokenInvalid,
            format!("token {id} is unknown or its secret does not match"),
        ),
        Refusal::Expired => (
            Reason::TokenExpired,
            format!("token {id} expired at {}", rfc3339(record.expires)),
        ),
        Refusal::UsedUp => (Reason::TokenUsedUp, format!("token {id} has no uses left")),
        Refusal::WrongMac { bound } => (
            Reason::TokenWrongMac,
            format!("token {id} was issued to the machine with MAC {bound}, not {mac}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_messages_name_the_token_not_its_secret() {
        let t: Token = "abcdef.0123456789abcdef".parse().unwrap();
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let rec = TokenRecord::boot(&t, mac, now, time::Duration::minutes(15));
        let other: Mac = "52:54:00:00:00:02".parse().unwrap();
        for r in [
            Refusal::Invalid,
            Refusal::Expired,
            Refusal::UsedUp,
            Refusal::WrongMac { bound: mac },
        ] {
            let (_, msg) = refusal(&r, &rec, other);
            assert!(
                msg.contains("abcdef") && !msg.contains("0123456789"),
                "{msg}"
            );
        }
    }
}
