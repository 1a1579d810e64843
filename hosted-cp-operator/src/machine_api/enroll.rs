//! `POST /v1/enroll`: token + CSR + facts → machine certificate.
//!
//! Order matters for "refusals create nothing" and "a power cut never strands a machine":
//! 1. rate limit, body, token syntax, CSR (signature checked: the sender holds the key),
//!    boot MAC — any failure is a refusal, nothing is read or written;
//! 2. the token's record is admitted ([`TokenRecord::admit`]): a refusal (unknown, expired,
//!    used up, other MAC) is a 403 and a Warning Event, nothing written;
//! 3. the Machine is chosen (existing by MAC/UUID, else `mac-<hex>`) and the token is spent
//!    for this key by compare-and-swap on its Secret — two nodes racing for a single-use
//!    token cannot both win;
//! 4. only then is the Machine created (if new), the certificate signed, and both recorded.
//!
//! A retry with the same key within the token's life is a replay: the same Machine, and the
//! same certificate if it is on record. A crash between 3 and 4 is finished by that retry.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Resource, ResourceExt};
use tether_api::Machine;
use tether_api::machine::MachineCertificate;
use tether_api::machine_api::{CONFIG_MAP, EnrollRequest, EnrollResponse, Reason};
use tether_api::token::{Admission, Refusal, TokenRecord};
use tether_boot::{Mac, Token};
use time::OffsetDateTime;

use super::Server;
use super::http::{Failure, read_json};
use super::inventory::{Inventory, rfc3339};
use crate::x509::Csr;

/// How long enrollments may keep retrying a compare-and-swap on one token's record (a pool
/// token that many machines spend at once); after each conflict, a jittered pause.
const CAS_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

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
    let (token, csr, mac) = check(&server, &req).await?;
    let (name, record) = server
        .spend_token(&token, mac, &csr, req.facts.uuid.as_deref())
        .await?;
    let inventory = Inventory::new(server.client.clone());
    let now = OffsetDateTime::now_utc();
    let machine = inventory
        .ensure(&name, mac, &req.facts, &record)
        .await
        .map_err(Failure::internal)?;
    let cert = server
        .certificate_for(&machine, &csr, now)
        .map_err(Failure::internal)?;
    inventory
        .record_enrollment(&machine, &req.facts, cert.clone(), now)
        .await
        .map_err(Failure::internal)?;
    tracing::info!(machine = %name, %mac, token = token.id(), "enrolled");
    Ok(Json(EnrollResponse {
        machine: name,
        certificate: cert.pem,
        ca: server.ca.cert_pem.clone(),
    }))
}

/// Everything about a request that can be judged without the cluster: token syntax, CSR
/// (its signature proves the sender holds the key), boot MAC, UUID.
async fn check(server: &Server, req: &EnrollRequest) -> Result<(Token, Csr, Mac), Failure> {
    let token: Token = match req.token.parse() {
        Ok(t) => t,
        Err(e) => {
            return Err(server
                .refuse(None, Reason::TokenMalformed, e.to_string())
                .await);
        }
    };
    let csr = Csr::parse(&req.csr).map_err(|e| Failure::new(Reason::BadRequest, e))?;
    let mac: Mac = req
        .facts
        .boot_mac
        .as_deref()
        .ok_or_else(|| Failure::new(Reason::BadRequest, "facts.bootMac is required"))?
        .parse()
        .map_err(|e: tether_boot::Error| Failure::new(Reason::BadRequest, e.to_string()))?;
    if let Some(u) = &req.facts.uuid
        && !is_uuid(u)
    {
        return Err(Failure::new(
            Reason::BadRequest,
            format!("facts.uuid {u:?} is not a lower-case UUID"),
        ));
    }
    Ok((token, csr, mac))
}

impl Server {
    /// Admits `token` for this node and, for a new enrollment, spends it by compare-and-swap
    /// on its Secret. Returns the Machine the node is and the token's record. Spends of one
    /// token are serialised in this process (a pool token that hundreds of machines spend at
    /// once would otherwise mostly collide); the compare-and-swap still guards against other
    /// operator replicas, retried with jittered pauses within [`CAS_BUDGET`].
    async fn spend_token(
        &self,
        token: &Token,
        mac: Mac,
        csr: &Csr,
        uuid: Option<&str>,
    ) -> Result<(String, TokenRecord), Failure> {
        let lock = self.spend_lock(token.id());
        let _held = lock.lock().await;
        let inventory = Inventory::new(self.client.clone());
        let deadline = std::time::Instant::now() + CAS_BUDGET;
        let mut conflicts = 0u32;
        let unknown = || {
            format!(
                "token {} is unknown or its secret does not match",
                token.id()
            )
        };
        while std::time::Instant::now() < deadline {
            let loaded = match self.tokens.get(token.id()).await {
                Ok(Some(l)) => l,
                Ok(None) => return Err(self.refuse(None, Reason::TokenInvalid, unknown()).await),
                Err(e) => {
                    tracing::warn!("token {}: {e}", token.id());
                    return Err(self.refuse(None, Reason::TokenInvalid, unknown()).await);
                }
            };
            let now = OffsetDateTime::now_utc();
            match loaded.record.admit(token, now, Some(mac), &csr.key_sha256) {
                Err(r) => {
                    let (reason, msg) = refusal(&r, &loaded.record, mac);
                    let regarding = loaded.secret.object_ref(&());
                    return Err(self.refuse(Some(regarding), reason, msg).await);
                }
                Ok(Admission::Replay { machine }) => return Ok((machine, loaded.record)),
                Ok(Admission::Spend) => {
                    let name = inventory.bind(mac, uuid).await.map_err(Failure::internal)?;
                    let mut spent = loaded.record.clone();
                    spent.spend(&csr.key_sha256, &name);
                    if self
                        .tokens
                        .replace(&loaded, &spent)
                        .await
                        .map_err(Failure::internal)?
                    {
                        tracing::info!(token = token.id(), machine = %name, %mac, "token spent");
                        return Ok((name, spent));
                    }
                    // Another replica spent or changed it meanwhile: decide again.
                    conflicts += 1;
                    tokio::time::sleep(cas_pause(conflicts)).await;
                }
            }
        }
        Err(Failure::new(
            Reason::Internal,
            "the token record kept changing; retry",
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
        let event = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Warning,
            reason: format!("{reason:?}"),
            note: Some(message.chars().take(1000).collect()),
            action: "Enroll".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &regarding).await {
            tracing::debug!("publish event: {e}");
        }
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

/// `8-4-4-4-12` lower-case hex.
fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        assert!(is_uuid("4c4c4544-0000-1000-8000-000000000001"));
        for bad in [
            "",
            "4C4C4544-0000-1000-8000-000000000001",
            "4c4c4544-0000-1000-8000-00000000001",
            "../../x",
            "4c4c4544_0000-1000-8000-000000000001",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

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
