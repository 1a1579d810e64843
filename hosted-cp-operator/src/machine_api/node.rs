//! The endpoints of an enrolled machine, `/v1/machines/{name}/…`: each one first checks that
//! the client certificate names this Machine and is the one (or the one just replaced) on
//! its record — a certificate reaches only its own Machine, and a deleted Machine's
//! certificate reaches nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use serde::Deserialize;
use serde_json::json;
use tether_api::Machine;
use tether_api::machine::AGENT_REACHABLE;
use tether_api::machine_api::{
    DesiredConfig, EnrollResponse, Reason, RenewRequest, StatusAck, StatusReport,
};
use time::OffsetDateTime;

use super::Server;
use super::certs::Peer;
use super::http::{Failure, read_json};
use super::inventory::{self, Inventory, rfc3339};
use crate::kube::{condition, merge_conditions};
use crate::x509::Csr;

/// Longest a long-poll is held.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

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

/// Query of the config long-poll.
#[derive(Debug, Deserialize)]
pub struct ConfigQuery {
    /// Answer once the generation is greater than this (default: at once).
    #[serde(default = "minus_one")]
    after: i64,
    /// Seconds to hold the request (at most [`MAX_WAIT`]).
    #[serde(default = "thirty")]
    timeout: u64,
}

fn minus_one() -> i64 {
    -1
}

fn thirty() -> u64 {
    30
}

/// `GET /v1/machines/{name}/config?after=G&timeout=S`
pub async fn config(
    State(server): State<Arc<Server>>,
    Extension(peer): Extension<Option<Peer>>,
    Path(name): Path<String>,
    Query(q): Query<ConfigQuery>,
) -> Result<Json<DesiredConfig>, Failure> {
    let wait = Duration::from_secs(q.timeout).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let notify = server.waiters.of(&name);
    loop {
        // Register for a wake-up before reading, so a change in between is not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let machine = authorize(&server, &peer, &name).await?;
        let cfg = inventory::desired(&machine, server.settings.report_seconds);
        if cfg.generation > q.after || tokio::time::Instant::now() >= deadline {
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
    let machine = authorize(&server, &peer, &name).await?;
    let report: StatusReport = read_json(body).await?;
    let now = OffsetDateTime::now_utc();
    let status = machine.status.clone().unwrap_or_default();
    let mut reported: Vec<_> = report
        .conditions
        .into_iter()
        .filter(|c| c.type_ != AGENT_REACHABLE)
        .collect();
    reported.push(condition(
        AGENT_REACHABLE,
        true,
        "Reporting",
        "the agent reports",
        None,
    ));
    let mut patch = json!({"status": {
        "phase": inventory::phase_after_report(status.phase, report.phase),
        "lastSeen": rfc3339(now),
        "agentVersion": report.agent_version,
        "currentImage": report.image_version,
        "bootSlot": report.boot_slot,
        "conditions": merge_conditions(&status.conditions, reported),
    }});
    // The new certificate is in use: the one it replaced is accepted no more.
    if let (Some(cert), Some(p)) = (&status.certificate, &peer)
        && cert.sha256 == p.sha256
        && cert.previous_sha256.is_some()
    {
        // A merge patch removes a field only when it says null.
        patch["status"]["certificate"] = json!({"previousSha256": null});
    }
    Inventory::new(server.client.clone())
        .patch_status(&name, &patch)
        .await
        .map_err(Failure::internal)?;
    Ok(Json(StatusAck {
        generation: machine.metadata.generation.unwrap_or(1),
    }))
}

/// `POST /v1/machines/{name}/renew`
pub async fn renew(
    State(server): State<Arc<Server>>,
    Extension(peer): Extension<Option<Peer>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<EnrollResponse>, Failure> {
    let req: RenewRequest = read_json(body).await?;
    let csr = Csr::parse(&req.csr).map_err(|e| Failure::new(Reason::BadRequest, e))?;
    let inventory = Inventory::new(server.client.clone());
    for _ in 0..4 {
        let machine = authorize(&server, &peer, &name).await?;
        let now = OffsetDateTime::now_utc();
        let cert = server
            .certificate_for(&machine, &csr, now)
            .map_err(Failure::internal)?;
        let unchanged = machine.status.as_ref().and_then(|s| s.certificate.as_ref()) == Some(&cert);
        if unchanged
            || inventory
                .record_certificate(&machine, &cert)
                .await
                .map_err(Failure::internal)?
        {
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
        "the Machine kept changing; retry",
    ))
}
