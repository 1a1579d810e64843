//! Kubeconfigs for the admin and the control-plane components, each with its own client
//! certificate from the tenant's cluster CA.
//!
//! [`ensure`] is pure like [`super::pki::ensure`]: an existing kubeconfig is kept while it
//! points at the same server, trusts the current CA and its certificate is fresh.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use time::OffsetDateTime;

use super::pki;
use crate::error::Error;
use crate::kube::{Files, render_kubeconfig};
use crate::x509::{self, LeafSpec};

/// One kubeconfig the operator maintains.
pub struct KubeconfigDef {
    /// Secret key / file name.
    pub file: &'static str,
    /// Client certificate common name (the Kubernetes user).
    pub user: &'static str,
    /// Organizations (groups).
    pub groups: &'static [&'static str],
    /// Whether it is for people and tools outside the control plane (uses the external
    /// endpoint) rather than for components next to the API server (loopback).
    pub external: bool,
}

/// The admin kubeconfig's file name in its Secret (kubeadm's name for it).
pub const ADMIN: &str = "admin.conf";

/// Every kubeconfig, admin first.
pub const KUBECONFIGS: &[KubeconfigDef] = &[
    KubeconfigDef {
        file: ADMIN,
        user: "kubernetes-admin",
        groups: &["system:masters"],
        external: true,
    },
    KubeconfigDef {
        file: "controller-manager.conf",
        user: "system:kube-controller-manager",
        groups: &[],
        external: false,
    },
    KubeconfigDef {
        file: "scheduler.conf",
        user: "system:kube-scheduler",
        groups: &[],
        external: false,
    },
    KubeconfigDef {
        file: "konnectivity-server.conf",
        user: "system:konnectivity-server",
        groups: &[],
        external: false,
    },
];

/// The server and CA a kubeconfig points at, and its client certificate.
fn parts(yaml: &[u8]) -> Option<(String, Vec<u8>, Vec<u8>)> {
    let v: serde_json::Value = serde_yaml::from_slice(yaml).ok()?;
    let cluster = &v["clusters"][0]["cluster"];
    let server = cluster["server"].as_str()?.to_string();
    let ca = STANDARD
        .decode(cluster["certificate-authority-data"].as_str()?)
        .ok()?;
    let cert = STANDARD
        .decode(v["users"][0]["user"]["client-certificate-data"].as_str()?)
        .ok()?;
    Some((server, ca, cert))
}

/// The kubeconfigs for a tenant whose PKI is `pki`. Components use `local_server`, the admin
/// kubeconfig `external_server`. Returns the full set and whether anything changed.
pub fn ensure(
    cluster: &str,
    pki: &Files,
    local_server: &str,
    external_server: &str,
    existing: &Files,
    now: OffsetDateTime,
) -> Result<(Files, bool), Error> {
    // Trust the bundle (old + next CA during a rotation); sign with the signing CA.
    let ca = pki
        .get("client-ca.crt")
        .or_else(|| pki.get("ca.crt"))
        .ok_or(Error::Pki {
            what: "kubeconfigs",
            detail: "the PKI has no ca.crt".into(),
        })?;
    let (signing_crt, ca_key) = pki::signing_ca(pki);
    let mut out = Files::new();
    let mut changed = false;
    for def in KUBECONFIGS {
        let server = if def.external {
            external_server
        } else {
            local_server
        };
        let keep = existing
            .get(def.file)
            .and_then(|y| parts(y))
            .is_some_and(|(s, c, cert)| {
                s == server && &c == ca && x509::cert_fresh_and_issued_by(&cert, signing_crt, now)
            });
        if keep {
            out.insert(def.file.to_string(), existing[def.file].clone());
            continue;
        }
        changed = true;
        let (cert, key) = x509::issue_with(
            signing_crt,
            ca_key,
            &LeafSpec::client(def.user, def.groups),
            now,
        )?;
        out.insert(
            def.file.to_string(),
            render_kubeconfig(
                cluster,
                server,
                ca,
                def.user,
                cert.as_bytes(),
                key.as_bytes(),
            )
            .into_bytes(),
        );
    }
    Ok((out, changed))
}

#[cfg(test)]
mod tests {
    use super::pki::PkiInputs;
    use super::*;

    fn pki() -> Files {
        let inputs = PkiInputs {
            tenant: "t".into(),
            dns_names: vec![],
            ips: vec!["127.0.0.1".parse().unwrap()],
        };
        pki::ensure(&inputs, &Files::new(), OffsetDateTime::now_utc())
            .unwrap()
            .0
    }

    #[test]
    fn kubeconfigs_point_where_they_should_and_are_stable() {
        let now = OffsetDateTime::now_utc();
        let p = pki();
        let (k, changed) = ensure(
            "t",
            &p,
            "https://127.0.0.1:1",
            "https://api.example:6443",
            &Files::new(),
            now,
        )
        .unwrap();
        assert!(changed);
        assert_eq!(parts(&k[ADMIN]).unwrap().0, "https://api.example:6443");
        assert_eq!(
            parts(&k["scheduler.conf"]).unwrap().0,
            "https://127.0.0.1:1"
        );
        assert_eq!(parts(&k["controller-manager.conf"]).unwrap().1, p["ca.crt"]);
        let (again, changed) = ensure(
            "t",
            &p,
            "https://127.0.0.1:1",
            "https://api.example:6443",
            &k,
            now,
        )
        .unwrap();
        assert!(!changed);
        assert_eq!(again, k);
    }

    #[test]
    fn changes_regenerate_only_what_they_touch() {
        let now = OffsetDateTime::now_utc();
        let p = pki();
        let (k, _) = ensure(
            "t",
            &p,
            "https://127.0.0.1:1",
            "https://a:1",
            &Files::new(),
            now,
        )
        .unwrap();
        // New external endpoint: only admin changes.
        let (k2, changed) = ensure("t", &p, "https://127.0.0.1:1", "https://b:1", &k, now).unwrap();
        assert!(changed);
        assert_ne!(k2[ADMIN], k[ADMIN]);
        assert_eq!(k2["scheduler.conf"], k["scheduler.conf"]);
        // New CA: everything changes.
        let p2 = pki();
        let (k3, _) = ensure("t", &p2, "https://127.0.0.1:1", "https://a:1", &k, now).unwrap();
        for def in KUBECONFIGS {
            assert_ne!(k3[def.file], k[def.file], "{}", def.file);
        }
        // A mangled file is replaced.
        let mut broken = k.clone();
        broken.insert("scheduler.conf".into(), b"{".to_vec());
        let (k4, changed) =
            ensure("t", &p, "https://127.0.0.1:1", "https://a:1", &broken, now).unwrap();
        assert!(changed && parts(&k4["scheduler.conf"]).is_some());
    }
}
