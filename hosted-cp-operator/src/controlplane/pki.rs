//! A tenant's PKI: the certificates and keys kubeadm would create, kept as one Secret.
//!
//! [`ensure`] is pure: given what the Secret holds now, the desired names/addresses and the
//! current time, it returns the complete set, reusing every valid item and regenerating only
//! what is missing, unparseable, near expiry or issued for other names. Reconciling twice
//! therefore changes nothing, and an operator killed half-way leaves the old, usable Secret.
//!
//! Certificates are made and checked by [`crate::x509`] (lifetimes, key type, freshness);
//! this module decides which ones a tenant has.

use std::collections::BTreeMap;
use std::net::IpAddr;

use rcgen::KeyPair;
use time::OffsetDateTime;

use crate::error::Error;
use crate::kube::Files;
use crate::x509::{
    LeafSpec, ca_usable, facts, issue, issuer, leaf_usable, new_ca, service_account_key, str_of,
};

/// What the certificates must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiInputs {
    /// Tenant name (CA common names carry it so two tenants' CAs are told apart).
    pub tenant: String,
    /// DNS names the API server must be valid for (besides the fixed kubernetes.* names).
    pub dns_names: Vec<String>,
    /// Addresses the API server must be valid for: the Service IP, the endpoint address,
    /// loopback, certSANs.
    pub ips: Vec<IpAddr>,
}

/// One certificate the PKI holds: file stem, issuing CA stem, and how to make it.
struct LeafDef {
    stem: &'static str,
    ca: &'static str,
    cn: &'static str,
    orgs: &'static [&'static str],
    server: bool,
    client: bool,
}

/// Every leaf, in the order kubeadm lists them.
const LEAVES: &[LeafDef] = &[
    LeafDef {
        stem: "apiserver",
        ca: "ca",
        cn: "kube-apiserver",
        orgs: &[],
        server: true,
        client: false,
    },
    LeafDef {
        stem: "apiserver-kubelet-client",
        ca: "ca",
        cn: "kube-apiserver-kubelet-client",
        orgs: &["system:masters"],
        server: false,
        client: true,
    },
    LeafDef {
        stem: "front-proxy-client",
        ca: "front-proxy-ca",
        cn: "front-proxy-client",
        orgs: &[],
        server: false,
        client: true,
    },
    LeafDef {
        stem: "konnectivity-server",
        ca: "ca",
        cn: "konnectivity-server",
        orgs: &[],
        server: true,
        client: false,
    },
];

/// The two CAs.
const CAS: &[(&str, &str)] = &[("ca", "kubernetes"), ("front-proxy-ca", "front-proxy-ca")];

/// The PKI for `inputs`, reusing whatever in `existing` is still right at `now`. Returns the
/// complete file set and whether anything changed.
pub fn ensure(
    inputs: &PkiInputs,
    existing: &Files,
    now: OffsetDateTime,
) -> Result<(Files, bool), Error> {
    ensure_rotating(inputs, existing, Rotation::Keep, now)
}

/// What to do about the cluster CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Keep whatever is there (a rotation in progress stays in progress).
    Keep,
    /// Start a rotation: add `ca-next.*` and trust both CAs (`client-ca.crt` is the
    /// bundle). Serving certificates stay with the old CA, so clients that only trust the old
    /// CA keep working; new kubeconfigs trust both and carry certificates of the new CA.
    Begin,
    /// Finish: the next CA becomes the CA, every leaf is re-issued by it and the old CA is
    /// no longer trusted.
    Complete,
}

/// The CA that signs new client certificates: `ca-next` during a rotation, else `ca`.
pub fn signing_ca(files: &Files) -> (&[u8], &[u8]) {
    match (files.get("ca-next.crt"), files.get("ca-next.key")) {
        (Some(c), Some(k)) => (c, k),
        _ => (&files["ca.crt"], &files["ca.key"]),
    }
}

/// [`ensure`] with a CA rotation step.
pub fn ensure_rotating(
    inputs: &PkiInputs,
    existing: &Files,
    rotation: Rotation,
    now: OffsetDateTime,
) -> Result<(Files, bool), Error> {
    let mut existing = existing.clone();
    let mut changed = false;
    let has_next = existing.contains_key("ca-next.crt") && existing.contains_key("ca-next.key");
    match rotation {
        Rotation::Keep => {}
        Rotation::Begin if has_next => {}
        Rotation::Begin => {
            let (c, k) = new_ca(&ca_cn("kubernetes", &inputs.tenant, now), now)?;
            existing.insert("ca-next.crt".into(), c.into_bytes());
            existing.insert("ca-next.key".into(), k.into_bytes());
            changed = true;
        }
        Rotation::Complete if has_next => {
            let c = existing.remove("ca-next.crt").expect("checked");
            let k = existing.remove("ca-next.key").expect("checked");
            existing.insert("ca.crt".into(), c);
            existing.insert("ca.key".into(), k);
            // Every leaf of the old CA goes: it is re-issued by the new one below.
            for leaf in LEAVES.iter().filter(|l| l.ca == "ca") {
                existing.remove(&format!("{}.crt", leaf.stem));
            }
            changed = true;
        }
        Rotation::Complete => {}
    }
    let (mut out, c2) = ensure_inner(inputs, &existing, now)?;
    if let (Some(c), Some(k)) = (existing.get("ca-next.crt"), existing.get("ca-next.key")) {
        out.insert("ca-next.crt".into(), c.clone());
        out.insert("ca-next.key".into(), k.clone());
    }
    let mut bundle = out["ca.crt"].clone();
    if let Some(next) = out.get("ca-next.crt") {
        bundle.extend_from_slice(next);
    }
    if existing.get("client-ca.crt") != Some(&bundle) {
        changed = true;
    }
    out.insert("client-ca.crt".into(), bundle);
    let (sc, sk) = signing_ca(&out);
    let (sc, sk) = (sc.to_vec(), sk.to_vec());
    if existing.get("signing-ca.crt") != Some(&sc) {
        changed = true;
    }
    out.insert("signing-ca.crt".into(), sc);
    out.insert("signing-ca.key".into(), sk);
    Ok((out, changed || c2))
}

/// CA common names carry the tenant and the creation time, so a rotated CA never shares
/// a subject with its predecessor (issuer checks then tell their leaves apart).
fn ca_cn(cn: &str, tenant: &str, now: OffsetDateTime) -> String {
    format!("{cn} ({tenant}) {}", now.unix_timestamp_nanos())
}

fn ensure_inner(
    inputs: &PkiInputs,
    existing: &Files,
    now: OffsetDateTime,
) -> Result<(Files, bool), Error> {
    let mut out = Files::new();
    let mut changed = false;
    let mut issuers = BTreeMap::new();
    let mut new_cas = Vec::new();
    for (stem, cn) in CAS {
        let (crt, key) = (format!("{stem}.crt"), format!("{stem}.key"));
        let reuse = match (existing.get(&crt), existing.get(&key)) {
            (Some(c), Some(k)) => ca_usable(c, k, now),
            _ => false,
        };
        let (cert_pem, key_pem) = if reuse {
            (existing[&crt].clone(), existing[&key].clone())
        } else {
            changed = true;
            new_cas.push(*stem);
            let (c, k) = new_ca(&ca_cn(cn, &inputs.tenant, now), now)?;
            (c.into_bytes(), k.into_bytes())
        };
        issuers.insert(*stem, issuer(&cert_pem, &key_pem)?);
        out.insert(crt, cert_pem);
        out.insert(key, key_pem);
    }

    for leaf in LEAVES {
        let (crt, key) = (format!("{}.crt", leaf.stem), format!("{}.key", leaf.stem));
        let (dns, ips): (Vec<String>, Vec<IpAddr>) = if leaf.server {
            let mut dns = vec![
                "kubernetes".to_string(),
                "kubernetes.default".to_string(),
                "kubernetes.default.svc".to_string(),
                "localhost".to_string(),
            ];
            dns.extend(inputs.dns_names.iter().cloned());
            (dns, inputs.ips.clone())
        } else {
            (vec![], vec![])
        };
        let reuse = !new_cas.contains(&leaf.ca)
            && match (existing.get(&crt), existing.get(&key)) {
                (Some(c), Some(_)) => {
                    leaf_usable(c, &out[&format!("{}.crt", leaf.ca)], &dns, &ips, now)
                }
                _ => false,
            };
        if reuse {
            out.insert(crt.clone(), existing[&crt].clone());
            out.insert(key.clone(), existing[&key].clone());
        } else {
            changed = true;
            let (c, k) = issue(
                &issuers[leaf.ca],
                &LeafSpec {
                    cn: leaf.cn,
                    orgs: leaf.orgs,
                    dns: &dns,
                    ips: &ips,
                    server: leaf.server,
                    client: leaf.client,
                },
                now,
            )?;
            out.insert(crt, c.into_bytes());
            out.insert(key, k.into_bytes());
        }
    }

    match (existing.get("sa.key"), existing.get("sa.pub")) {
        (Some(k), Some(p)) if KeyPair::from_pem(str_of(k)?).is_ok() => {
            out.insert("sa.key".into(), k.clone());
            out.insert("sa.pub".into(), p.clone());
        }
        _ => {
            changed = true;
            let (key, public) = service_account_key()?;
            out.insert("sa.key".into(), key.into_bytes());
            out.insert("sa.pub".into(), public.into_bytes());
        }
    }
    Ok((out, changed))
}

/// Seconds until the earliest leaf in `files` passes two thirds of its life, for requeueing
/// renewal; `None` if nothing parses.
pub fn renew_in(files: &Files, now: OffsetDateTime) -> Option<std::time::Duration> {
    LEAVES
        .iter()
        .filter_map(|l| facts(files.get(&format!("{}.crt", l.stem))?))
        .map(|f| {
            let life = f.not_after - f.not_before;
            let renew_at = f.not_after - life / 3;
            (renew_at - now.unix_timestamp()).max(0) as u64
        })
        .min()
        .map(std::time::Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::{ca_hash, cert_fresh_and_issued_by};
    use time::Duration;

    fn inputs() -> PkiInputs {
        PkiInputs {
            tenant: "default/t1".into(),
            dns_names: vec!["t1.default.svc".into()],
            ips: vec!["127.0.0.1".parse().unwrap(), "10.96.0.1".parse().unwrap()],
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn fresh_pki_has_every_file_and_is_stable() {
        let (files, changed) = ensure(&inputs(), &Files::new(), now()).unwrap();
        assert!(changed);
        for f in [
            "ca.crt",
            "ca.key",
            "front-proxy-ca.crt",
            "front-proxy-ca.key",
            "apiserver.crt",
            "apiserver.key",
            "apiserver-kubelet-client.crt",
            "front-proxy-client.crt",
            "konnectivity-server.crt",
            "sa.key",
            "sa.pub",
        ] {
            assert!(files.contains_key(f), "{f}");
        }
        let (again, changed) = ensure(&inputs(), &files, now()).unwrap();
        assert!(!changed);
        assert_eq!(again, files);
    }

    #[test]
    fn apiserver_sans_cover_service_ip_endpoint_and_names() {
        let (files, _) = ensure(&inputs(), &Files::new(), now()).unwrap();
        let f = facts(&files["apiserver.crt"]).unwrap();
        for d in [
            "kubernetes",
            "kubernetes.default.svc",
            "localhost",
            "t1.default.svc",
        ] {
            assert!(f.dns.iter().any(|x| x == d), "{d} in {:?}", f.dns);
        }
        assert!(f.ips.contains(&"10.96.0.1".parse().unwrap()));
        assert!(f.ips.contains(&"127.0.0.1".parse().unwrap()));
        assert_eq!(f.issuer, facts(&files["ca.crt"]).unwrap().subject);
        let fp = facts(&files["front-proxy-client.crt"]).unwrap();
        assert_eq!(
            fp.issuer,
            facts(&files["front-proxy-ca.crt"]).unwrap().subject
        );
    }

    #[test]
    fn what_changes_is_regenerated_and_nothing_else() {
        let (base, _) = ensure(&inputs(), &Files::new(), now()).unwrap();
        type Case = (
            &'static str,
            fn(&mut Files, &mut PkiInputs),
            &'static [&'static str],
            &'static [&'static str],
        );
        let table: &[Case] = &[
            (
                "new SAN",
                |_, i| i.ips.push("192.0.2.9".parse().unwrap()),
                &["apiserver.crt", "konnectivity-server.crt"],
                &["ca.crt", "apiserver-kubelet-client.crt", "sa.key"],
            ),
            (
                "lost leaf",
                |f, _| {
                    f.remove("apiserver-kubelet-client.key");
                },
                &["apiserver-kubelet-client.crt"],
                &["ca.crt", "apiserver.crt"],
            ),
            (
                "garbage leaf",
                |f, _| {
                    f.insert("apiserver.crt".into(), b"junk".to_vec());
                },
                &["apiserver.crt"],
                &["ca.crt", "front-proxy-client.crt"],
            ),
            (
                "lost CA key: every leaf of it",
                |f, _| {
                    f.remove("ca.key");
                },
                &["ca.crt", "apiserver.crt", "apiserver-kubelet-client.crt"],
                &["front-proxy-ca.crt", "front-proxy-client.crt", "sa.key"],
            ),
            (
                "mismatched CA key",
                |f, _| {
                    let (_, k) = new_ca("x", now()).unwrap();
                    f.insert("ca.key".into(), k.into_bytes());
                },
                &["ca.crt", "apiserver.crt"],
                &["front-proxy-ca.crt"],
            ),
            (
                "lost sa key",
                |f, _| {
                    f.remove("sa.pub");
                },
                &["sa.key"],
                &["ca.crt", "apiserver.crt"],
            ),
        ];
        for (name, edit, regenerated, kept) in table {
            let mut files = base.clone();
            let mut inp = inputs();
            edit(&mut files, &mut inp);
            let (out, changed) = ensure(&inp, &files, now()).unwrap();
            assert!(changed, "{name}");
            for r in *regenerated {
                assert_ne!(out[*r], base[*r], "{name}: {r} regenerated");
            }
            for k in *kept {
                assert_eq!(out[*k], base[*k], "{name}: {k} kept");
            }
        }
    }

    #[test]
    fn leaves_renew_when_two_thirds_of_life_passed() {
        let (base, _) = ensure(&inputs(), &Files::new(), now()).unwrap();
        let in_250_days = now() + Duration::days(250);
        assert!(
            !ensure(&inputs(), &base, now() + Duration::days(100))
                .unwrap()
                .1
        );
        let (out, changed) = ensure(&inputs(), &base, in_250_days).unwrap();
        assert!(changed);
        assert_eq!(out["ca.crt"], base["ca.crt"]);
        assert_ne!(out["apiserver.crt"], base["apiserver.crt"]);
        let d = renew_in(&base, now()).unwrap().as_secs();
        assert!((240 * 86400..=244 * 86400).contains(&d), "{d}");
    }

    #[test]
    fn ca_rotation_trusts_both_then_only_the_new_ca() {
        let t = now();
        let (base, _) = ensure(&inputs(), &Files::new(), t).unwrap();
        assert_eq!(base["client-ca.crt"], base["ca.crt"]);
        assert_eq!(base["signing-ca.crt"], base["ca.crt"]);

        // Begin: a next CA, trusted alongside the old one; serving certificates unchanged.
        let (begun, changed) = ensure_rotating(&inputs(), &base, Rotation::Begin, t).unwrap();
        assert!(changed);
        let next = begun["ca-next.crt"].clone();
        assert_eq!(begun["ca.crt"], base["ca.crt"]);
        assert_eq!(begun["apiserver.crt"], base["apiserver.crt"]);
        assert_eq!(
            begun["client-ca.crt"],
            [base["ca.crt"].clone(), next.clone()].concat()
        );
        assert_eq!(begun["signing-ca.crt"], next);
        // Begin again / Keep: stable.
        for r in [Rotation::Begin, Rotation::Keep] {
            let (again, changed) = ensure_rotating(&inputs(), &begun, r, t).unwrap();
            assert!(!changed, "{r:?}");
            assert_eq!(again, begun);
        }

        // Complete: the next CA is the CA, every cluster-CA leaf re-issued by it.
        let (done, changed) = ensure_rotating(&inputs(), &begun, Rotation::Complete, t).unwrap();
        assert!(changed);
        assert_eq!(done["ca.crt"], next);
        assert!(!done.contains_key("ca-next.crt"));
        assert_eq!(done["client-ca.crt"], next);
        for leaf in [
            "apiserver.crt",
            "apiserver-kubelet-client.crt",
            "konnectivity-server.crt",
        ] {
            assert_ne!(done[leaf], base[leaf], "{leaf}");
            assert!(cert_fresh_and_issued_by(&done[leaf], &next, t), "{leaf}");
        }
        assert_eq!(done["front-proxy-ca.crt"], base["front-proxy-ca.crt"]);
        assert_eq!(done["sa.key"], base["sa.key"]);
        assert_ne!(
            ca_hash(&done["ca.crt"]).unwrap(),
            ca_hash(&base["ca.crt"]).unwrap()
        );
        // Complete without a rotation in progress changes nothing.
        let (same, changed) = ensure_rotating(&inputs(), &done, Rotation::Complete, t).unwrap();
        assert!(!changed);
        assert_eq!(same, done);
    }
}
