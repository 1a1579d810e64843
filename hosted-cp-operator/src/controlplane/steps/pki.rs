//! The tenant's PKI Secret (`<name>-pki`): its CAs, serving and client certificates and
//! service-account key ([`crate::controlplane::pki`] decides them), renewed before expiry,
//! with the cluster CA rotated in two steps on request (annotations
//! `tether.dev/rotate-ca` and `tether.dev/rotate-ca-complete`).

use std::net::IpAddr;

use futures::future::BoxFuture;
use tether_api::TenantControlPlane;
use tether_api::tenant_control_plane::{self as tcpmod, CaRotationStatus};
use time::OffsetDateTime;

use crate::controlplane::pipeline::{Flow, State, Step, Tenant, need};
use crate::controlplane::pki::{self, PkiInputs, Rotation};
use crate::controlplane::render;
use crate::error::Error;
use crate::kube::Files;
use crate::x509;

/// The PKI as the `pki` step left it.
pub struct TenantPki {
    /// The Secret's contents.
    pub files: Files,
    /// The cluster CA's pin.
    pub ca_hash: String,
    /// The rotation step taken this time.
    pub rotation: Rotation,
    /// Rotation progress to record in status, if any.
    pub rotation_status: Option<CaRotationStatus>,
}

/// The PKI Secret.
pub struct PkiSecret;

impl Step for PkiSecret {
    fn name(&self) -> &'static str {
        "pki"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(ensure(s))
    }

    fn cleanup<'a>(&'a self, t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        Some(Box::pin(
            async move { t.delete_secret(&t.names().pki).await },
        ))
    }
}

async fn ensure(s: &mut State<'_>) -> Result<Flow, Error> {
    let placement = need(&s.placement, "placement")?;
    let t = &s.t;
    let inputs = inputs(t.tcp, &t.ns, &t.name, &placement.host);
    let pki_secret = t.names().pki;
    let existing = t.read_secret(&pki_secret).await?;
    let annotations = t.tcp.metadata.annotations.clone().unwrap_or_default();
    let (rotation, rotation_status) = rotation_step(
        annotations.get(tcpmod::ROTATE_CA_ANNOTATION),
        annotations.get(tcpmod::ROTATE_CA_COMPLETE_ANNOTATION),
        s.status.ca_rotation.as_ref(),
    );
    let (files, changed) =
        pki::ensure_rotating(&inputs, &existing, rotation, OffsetDateTime::now_utc())?;
    if changed {
        t.apply_secret(&pki_secret, &files).await?;
    }
    let ca_hash = x509::ca_hash(&files["ca.crt"])?;
    s.pki = Some(TenantPki {
        files,
        ca_hash,
        rotation,
        rotation_status,
    });
    Ok(Flow::Next)
}

/// What the API server's certificate must name: loopback, the Service IP, the endpoint's
/// address (`host`, an IP or a DNS name), the in-cluster names and the spec's certSANs.
fn inputs(tcp: &TenantControlPlane, ns: &str, name: &str, host: &str) -> PkiInputs {
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
    ips.extend(render::service_ip(&tcp.spec));
    ips.extend(host.parse::<IpAddr>().ok());
    let mut dns = vec![
        name.to_string(),
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
        format!(
            "kubernetes.default.svc.{}",
            tcp.spec.network_profile.cluster_domain
        ),
    ];
    if host.parse::<IpAddr>().is_err() {
        dns.push(host.to_string());
    }
    for san in &tcp.spec.network_profile.cert_sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(san.clone()),
        }
    }
    PkiInputs {
        tenant: format!("{ns}/{name}"),
        dns_names: dns,
        ips,
    }
}

/// The rotation step for the annotations and the recorded progress, and the progress to
/// record once the step succeeded (`None`: nothing to record).
pub fn rotation_step(
    start: Option<&String>,
    complete: Option<&String>,
    recorded: Option<&CaRotationStatus>,
) -> (Rotation, Option<CaRotationStatus>) {
    let Some(id) = start else {
        return (Rotation::Keep, None);
    };
    let rec = |phase: &str| {
        Some(CaRotationStatus {
            id: id.clone(),
            phase: phase.into(),
        })
    };
    match recorded {
        Some(r) if &r.id == id && r.phase == "Completed" => (Rotation::Keep, None),
        Some(r) if &r.id == id && complete == Some(id) => (Rotation::Complete, rec("Completed")),
        Some(r) if &r.id == id => (Rotation::Keep, None),
        // A new id (or none recorded yet) starts a rotation.
        _ => (Rotation::Begin, rec("Trusting")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_steps() {
        let s = |x: &str| Some(x.to_string());
        let rec = |id: &str, phase: &str| {
            Some(CaRotationStatus {
                id: id.into(),
                phase: phase.into(),
            })
        };
        type Case = (
            Option<String>,
            Option<String>,
            Option<CaRotationStatus>,
            Rotation,
            Option<&'static str>,
        );
        let table: Vec<Case> = vec![
            (None, None, None, Rotation::Keep, None),
            (s("r1"), None, None, Rotation::Begin, Some("Trusting")),
            (s("r1"), None, rec("r1", "Trusting"), Rotation::Keep, None),
            (
                s("r1"),
                s("r0"),
                rec("r1", "Trusting"),
                Rotation::Keep,
                None,
            ),
            (
                s("r1"),
                s("r1"),
                rec("r1", "Trusting"),
                Rotation::Complete,
                Some("Completed"),
            ),
            (
                s("r1"),
                s("r1"),
                rec("r1", "Completed"),
                Rotation::Keep,
                None,
            ),
            (
                s("r2"),
                s("r1"),
                rec("r1", "Completed"),
                Rotation::Begin,
                Some("Trusting"),
            ),
            // Completing before the rotation was recorded as begun is not possible.
            (s("r1"), s("r1"), None, Rotation::Begin, Some("Trusting")),
        ];
        for (start, complete, recorded, want, want_phase) in table {
            let (r, st) = rotation_step(start.as_ref(), complete.as_ref(), recorded.as_ref());
            assert_eq!(r, want, "{start:?} {complete:?} {recorded:?}");
            assert_eq!(st.map(|x| x.phase).as_deref(), want_phase);
        }
    }
}
