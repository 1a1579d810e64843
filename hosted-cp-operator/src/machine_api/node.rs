//! The endpoints of an enrolled machine, `/v1/machines/{name}/…`: each one first checks that
//! the client certificate names this Machine and is the one (or the one just replaced) on
//! its record — a certificate reaches only its own Machine, and a deleted Machine's
//! certificate reaches nothing — before it reads a body or keeps any state.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use serde_json::json;
use tether_api::machine::AGENT_REACHABLE;
use tether_api::machine_api::{
    DesiredConfig, EnrollResponse, Join, Reason, RenewRequest, StatusAck, StatusReport,
};
use tether_api::{Machine, MachinePhase};

use super::Server;
use super::certs::Peer;
use super::http::{Failure, read_json};
use super::inventory::{self, Inventory, Written};
use crate::error::Error;
use crate::kube::{condition, merge_conditions, now_rfc3339, read_secret};
use crate::machines::join;
use crate::x509::Csr;

/// Longest a long-poll is held.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Conditions an agent may report (beyond it, the report is refused: a Machine object must
/// not grow without bound).
pub const MAX_AGENT_CONDITIONS: usize = 16;
/// Compare-and-swap attempts on a Machine's status.
const ATTEMPTS: usize = 8;

/// Checks the caller may act as Machine `name`; returns the Machine as read now.
async fn authorize(server: &Server, peer: &Option<Peer>, name: &str) -> Result<Machine, Failure> {
    let Some(peer) = peer else {
        return Err(Failure::new(
            Reason::CertificateRequired,
            "this endpoint needs the machine certificate from enrollment",
        ));
    };
    match &peer.machine {
        Some(m) if m == name => {}
        Some(m) => {
            return Err(Failure::new(
                Reason::Forbidden,
                format!("this certificate is Machine {m}'s, not {name}'s"),
            ));
        }
        None => {
            return Err(Failure::new(
                Reason::Forbidden,
                "this certificate names no Machine",
            ));
        }
    }
    let machine = Inventory::new(server.client.clone())
        .get(name)
        .await
        .map_err(Failure::internal)?
        .ok_or_else(|| {
            Failure::new(
                Reason::Forbidden,
                format!("Machine {name} no longer exists; its certificates are revoked"),
            )
        })?;
    let record = machine.status.as_ref().and_then(|s| s.certificate.as_ref());
    let accepted = record.is_some_and(|c| {
        c.sha256 == peer.sha256 || c.previous_sha256.as_deref() == Some(peer.sha256.as_str())
    });
    if !accepted {
        return Err(Failure::new(
            Reason::Forbidden,
            format!(
                "this certificate is no longer on Machine {name}'s record (revoked or replaced)"
            ),
        ));
    }
    Ok(machine)
}

/// The desired config of `machine`, with the join its pool rendered (the Secret
/// `tether-join-<machine>`, which only this Machine's certificate reaches).
async fn desired_of(server: &Server, machine: &Machine) -> Result<DesiredConfig, Failure> {
    let join = if inventory::serves_join(machine) {
        read_join(server, machine).await?
    } else {
        None
    };
    Ok(inventory::desired(
        machine,
        server.settings.report_seconds,
        join,
    ))
}

async fn read_join(server: &Server, machine: &Machine) -> Result<Option<Join>, Failure> {
    let secrets: Api<Secret> = Api::namespaced(server.client.clone(), &server.namespace);
    let files = read_secret(&secrets, &join::secret_name(&machine.name_any()))
        .await
        .map_err(Failure::internal)?;
    if !join::bound_to(&files, machine) {
        return Ok(None); // left from an earlier claim or Machine: never served
    }
    let name = machine.name_any();
    files
        .get(join::JOIN_KEY)
        .map(|b| serde_json::from_slice(b))
        .transpose()
        .map_err(|e| Failure::internal(Error::Invalid(format!("join Secret of {name}: {e}"))))
}

/// `version` and `timeout` of the long-poll's query (anything else is ignored; a malformed
/// value is a JSON refusal like every other).
fn parse_query(q: Option<&str>) -> Result<(Option<String>, Duration), Failure> {
    let mut version = None;
    let mut wait = Duration::from_secs(30);
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("version", v)) if v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                version = Some(v.to_string())
            }
            Some(("timeout", t)) => {
                let secs: u64 = t.parse().map_err(|_| {
                    Failure::new(
                        Reason::BadRequest,
                        format!("timeout={t:?} is not a number of seconds"),
                    )
                })?;
                wait = Duration::from_secs(secs).min(MAX_WAIT);
            }
            Some(("version", v)) => {
                return Err(Failure::new(
                    Reason::BadRequest,
                    format!("version={v:?} is not a config version"),
                ));
            }
            _ => {}
        }
    }
    Ok((version, wait))
}

/// `GET /v1/machines/{name}/config?version=V&timeout=S`: answers as soon as the desired
/// config's version differs from V (at once without V), else with the current one after S.
pub async fn config(
    State(server): State<Arc<Server>>,
    Extension(peer): Extension<Option<Peer>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<DesiredConfig>, Failure> {
    let (known, wait) = parse_query(query.as_deref())?;
    authorize(&server, &peer, &name).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let notify = server.waiters.of(&name);
    loop {
        // Register for a wake-up before reading, so a change in between is not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let machine = authorize(&server, &peer, &name).await?;
        let cfg = desired_of(&server, &machine).await?;
        if known.as_deref() != Some(cfg.version.as_str()) || tokio::time::Instant::now() >= deadline
        {
            return Ok(Json(cfg));
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// `POST /v1/machines/{name}/status`
pub async fn status(
    State(server): State<Arc<Server>>,
    Extension(peer): Extension<Option<Peer>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<StatusAck>, Failure> {
    authorize(&server, &peer, &name).await?;
    let report: StatusReport = read_json(body).await?;
    if report.conditions.len() > MAX_AGENT_CONDITIONS {
        return Err(Failure::new(
            Reason::BadRequest,
            format!("at most {MAX_AGENT_CONDITIONS} conditions"),
        ));
    }
    let inventory = Inventory::new(server.client.clone());
    for _ in 0..ATTEMPTS {
        let machine = authorize(&server, &peer, &name).await?;
        let patch = report_patch(&machine, &report, peer.as_ref());
        if inventory
            .patch_status_at(&machine, patch)
            .await
            .map_err(Failure::internal)?
            == Written::Yes
        {
            return Ok(Json(StatusAck {
                version: desired_of(&server, &machine).await?.version,
            }));
        }
    }
    Err(Failure::new(
        Reason::Internal,
        format!("Machine {name} kept changing; retry"),
    ))
}

/// The status patch for a report on `machine` (as read).
fn report_patch(
    machine: &Machine,
    report: &StatusReport,
    peer: Option<&Peer>,
) -> serde_json::Value {
    let status = machine.status.clone().unwrap_or_default();
    let mut reported: Vec<_> = report
        .conditions
        .iter()
        .filter(|c| c.type_ != AGENT_REACHABLE)
        .cloned()
        .map(|mut c| {
            // A transition the agent did not date is dated now (kept while unchanged).
            c.last_transition_time.get_or_insert_with(now_rfc3339);
            c
        })
        .collect();
    reported.push(condition(
        AGENT_REACHABLE,
        true,
        "Reporting",
        "the agent reports",
        None,
    ));
    let mut patch = json!({"status": {
        "phase": if machine.spec.pool.is_none()
            && status.phase == MachinePhase::Released
            && report.tenant.is_none()
        {
            // Given back and clean, but the pool's last write was lost: free.
            MachinePhase::Enrolled
        } else {
            inventory::phase_after_report(status.phase, report.phase)
        },
        "lastSeen": now_rfc3339(),
        "nodeIP": inventory::node_ip(peer.and_then(|p| p.remote), status.facts.as_ref()),
        "tenant": report.tenant,
        "needsBootstrapToken": report.needs_bootstrap_token,
        "agentVersion": report.agent_version,
        "currentImage": report.image_version,
        "bootSlot": report.boot_slot,
        "conditions": merge_conditions(&status.conditions, reported),
    }});
    // The new certificate is in use: the one it replaced is accepted no more. (A merge patch
    // removes a field only when it says null.)
    if let (Some(cert), Some(p)) = (&status.certificate, peer)
        && cert.sha256 == p.sha256
        && cert.previous_sha256.is_some()
    {
        patch["status"]["certificate"] = json!({"previousSha256": null});
    }
    patch
}

/// `POST /v1/machines/{name}/renew`
pub async fn renew(
    State(server): State<Arc<Server>>,
    Extension(peer): Extension<Option<Peer>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<EnrollResponse>, Failure> {
    authorize(&server, &peer, &name).await?;
    let req: RenewRequest = read_json(body).await?;
    let csr = Csr::parse(&req.csr).map_err(|e| Failure::new(Reason::BadRequest, e))?;
    let inventory = Inventory::new(server.client.clone());
    for _ in 0..ATTEMPTS {
        let machine = authorize(&server, &peer, &name).await?;
        let now = time::OffsetDateTime::now_utc();
        let cert = server
            .certificate_for(&machine, &csr, now)
            .map_err(Failure::internal)?;
        let recorded = machine.status.as_ref().and_then(|s| s.certificate.as_ref());
        let written = if recorded == Some(&cert) {
            Written::Yes
        } else {
            inventory
                .patch_status_at(&machine, json!({"status": {"certificate": cert}}))
                .await
                .map_err(Failure::internal)?
        };
        if written == Written::Yes {
            tracing::info!(machine = %name, "machine certificate renewed");
            return Ok(Json(EnrollResponse {
                machine: name,
                certificate: cert.pem,
                ca: server.ca.cert_pem.clone(),
            }));
        }
    }
    Err(Failure::new(
        Reason::Internal,
        format!("Machine {name} kept changing; retry"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_poll_queries() {
        let ok = |q: &str| parse_query(Some(q)).unwrap();
        assert_eq!(ok(""), (None, Duration::from_secs(30)));
        assert_eq!(
            ok("version=ab12&timeout=5"),
            (Some("ab12".into()), Duration::from_secs(5))
        );
        assert_eq!(ok("timeout=9999").1, MAX_WAIT);
        assert_eq!(ok("other=x").0, None);
        for bad in [
            "timeout=soon",
            "version=zz",
            &format!("version={}", "a".repeat(65)),
        ] {
            let err = parse_query(Some(bad)).unwrap_err();
            assert_eq!(err.0.reason, Reason::BadRequest, "{bad}");
        }
    }
}
