//! Certificates: CAs, leaves they issue, and the checks that decide whether a stored
//! certificate can be kept (its key matches, it was issued by this CA, it is fresh, it
//! names what it must). One set of helpers for the tenant PKI, standalone's management
//! plane and the test harness, so every certificate Tether makes is made the same way.
//!
//! Keys are ECDSA P-256 (fast to generate; accepted by every component, service-account
//! signing included). CAs live ten years, leaves one year, both backdated five minutes for
//! clocks slightly behind; a certificate counts as fresh until two thirds of its life.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use tether_boot::CaPin;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

use crate::error::Error;
use crate::fs::write_atomic;

const CA_LIFETIME: Duration = Duration::days(3650);
const LEAF_LIFETIME: Duration = Duration::days(365);

/// What a client or serving certificate says.
pub struct LeafSpec<'a> {
    /// Common name (the user name for clients).
    pub cn: &'a str,
    /// Organizations (the groups for clients).
    pub orgs: &'a [&'a str],
    /// DNS SANs.
    pub dns: &'a [String],
    /// IP SANs.
    pub ips: &'a [IpAddr],
    /// serverAuth usage.
    pub server: bool,
    /// clientAuth usage.
    pub client: bool,
}

impl<'a> LeafSpec<'a> {
    /// A client certificate for user `cn` in groups `orgs`.
    pub fn client(cn: &'a str, orgs: &'a [&'a str]) -> LeafSpec<'a> {
        LeafSpec {
            cn,
            orgs,
            dns: &[],
            ips: &[],
            server: false,
            client: true,
        }
    }

    /// A serving certificate for `dns` and `ips`.
    pub fn server(cn: &'a str, dns: &'a [String], ips: &'a [IpAddr]) -> LeafSpec<'a> {
        LeafSpec {
            cn,
            orgs: &[],
            dns,
            ips,
            server: true,
            client: false,
        }
    }
}

/// A fresh self-signed CA: `(cert PEM, key PEM)`.
pub fn new_ca(cn: &str, now: OffsetDateTime) -> Result<(String, String), Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn, &[]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + CA_LIFETIME;
    let key = KeyPair::generate().map_err(Error::pki("generate CA key"))?;
    let cert = params
        .self_signed(&key)
        .map_err(Error::pki("self-sign CA"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a leaf signed by the CA in `ca_cert`/`ca_key` (PEM): `(cert PEM, key PEM)`.
pub fn issue_with(
    ca_cert: &[u8],
    ca_key: &[u8],
    spec: &LeafSpec<'_>,
    now: OffsetDateTime,
) -> Result<(String, String), Error> {
    issue(&issuer(ca_cert, ca_key)?, spec, now)
}

/// Issues a leaf signed by `issuer`: `(cert PEM, key PEM)`.
pub(crate) fn issue(
    issuer: &Issuer<'_, KeyPair>,
    spec: &LeafSpec<'_>,
    now: OffsetDateTime,
) -> Result<(String, String), Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(spec.cn, spec.orgs);
    params.subject_alt_names = spec
        .dns
        .iter()
        .map(|d| {
            d.clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(Error::pki("DNS name in SAN"))
        })
        .chain(spec.ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
        .collect::<Result<_, Error>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if spec.server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if spec.client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + LEAF_LIFETIME;
    let key = KeyPair::generate().map_err(Error::pki("generate key"))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(Error::pki("sign certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `sha256:<hex>` of the certificate's DER SubjectPublicKeyInfo: the pin `kubeadm join
/// --discovery-token-ca-cert-hash` takes, computed by the one definition every program
/// shares ([`CaPin`]).
pub fn ca_hash(cert_pem: &[u8]) -> Result<String, Error> {
    CaPin::of_certificate_pem(cert_pem)
        .map(|pin| pin.to_string())
        .map_err(|e| Error::Pki {
            what: "CA pin",
            detail: e.to_string(),
        })
}

/// A key pair for signing service-account tokens: `(private PEM, public PEM)`.
pub fn service_account_key() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(Error::pki("generate service-account key"))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// The public half (PEM) of the private key `key_pem`.
pub fn public_key_pem(key_pem: &[u8]) -> Result<String, Error> {
    let key = KeyPair::from_pem(str_of(key_pem)?).map_err(Error::pki("load key"))?;
    Ok(key.public_key_pem())
}

/// A loaded CA that signs leaves, from its PEM certificate and key.
pub(crate) fn issuer(cert_pem: &[u8], key_pem: &[u8]) -> Result<Issuer<'static, KeyPair>, Error> {
    let key = KeyPair::from_pem(str_of(key_pem)?).map_err(Error::pki("load CA key"))?;
    Issuer::from_ca_cert_pem(str_of(cert_pem)?, key).map_err(Error::pki("load CA certificate"))
}

/// Facts about a certificate the reuse decisions need.
pub(crate) struct CertFacts {
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    pub(crate) issuer: Vec<u8>,
    pub(crate) subject: Vec<u8>,
    pub(crate) dns: Vec<String>,
    pub(crate) ips: Vec<IpAddr>,
    pub(crate) is_ca: bool,
}

pub(crate) fn facts(pem_bytes: &[u8]) -> Option<CertFacts> {
    let (_, pem) = parse_x509_pem(pem_bytes).ok()?;
    let cert = pem.parse_x509().ok()?;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some(CertFacts {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer: cert.issuer().as_raw().to_vec(),
        subject: cert.subject().as_raw().to_vec(),
        dns,
        ips,
        is_ca: cert.is_ca(),
    })
}

/// Valid for more than a third of its lifetime from `now`.
pub(crate) fn fresh(f: &CertFacts, now: OffsetDateTime) -> bool {
    let now = now.unix_timestamp();
    let life = f.not_after - f.not_before;
    f.not_before <= now && f.not_after - now > life / 3
}

pub(crate) fn ca_usable(cert: &[u8], key: &[u8], now: OffsetDateTime) -> bool {
    let Some(f) = facts(cert) else { return false };
    f.is_ca && fresh(&f, now) && key_matches(cert, key)
}

/// Whether the PEM private key `key` belongs to the PEM certificate `cert` (a pair written
/// as two files may be torn by a crash between the writes).
pub fn key_matches(cert: &[u8], key: &[u8]) -> bool {
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let Ok(key) = KeyPair::from_pem(key) else {
        return false;
    };
    let Ok((_, pem)) = parse_x509_pem(cert) else {
        return false;
    };
    let Ok(parsed) = pem.parse_x509() else {
        return false;
    };
    parsed.public_key().raw == key.subject_public_key_info().as_slice()
}

pub(crate) fn leaf_usable(
    cert: &[u8],
    ca_cert: &[u8],
    dns: &[String],
    ips: &[IpAddr],
    now: OffsetDateTime,
) -> bool {
    let (Some(f), Some(ca)) = (facts(cert), facts(ca_cert)) else {
        return false;
    };
    let mut want_dns: Vec<&String> = dns.iter().collect();
    let mut have_dns: Vec<&String> = f.dns.iter().collect();
    want_dns.sort();
    want_dns.dedup();
    have_dns.sort();
    have_dns.dedup();
    let mut want_ips = ips.to_vec();
    let mut have_ips = f.ips.clone();
    want_ips.sort();
    want_ips.dedup();
    have_ips.sort();
    have_ips.dedup();
    f.issuer == ca.subject && fresh(&f, now) && want_dns == have_dns && want_ips == have_ips
}

/// Whether the PEM certificate `cert` was issued by the CA in `ca` and is fresh at `now`.
pub fn cert_fresh_and_issued_by(cert: &[u8], ca: &[u8], now: OffsetDateTime) -> bool {
    match (facts(cert), facts(ca)) {
        (Some(f), Some(ca)) => f.issuer == ca.subject && fresh(&f, now),
        _ => false,
    }
}

fn dn(cn: &str, orgs: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

pub(crate) fn str_of(b: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(b).map_err(|e| Error::Pki {
        what: "PEM is not UTF-8",
        detail: e.to_string(),
    })
}

/// A CA (`dir/<ca>.crt`, `.key`) and a leaf it issued (`dir/<leaf>.crt`, `.key`), created on
/// first use. A pair counts only when both files exist and the key belongs to the
/// certificate, so a kill between the two writes leaves nothing half-made that is taken for
/// whole; a leaf that is missing, not issued by the CA or past two thirds of its life is
/// (re-)issued, so a restart also renews it.
pub fn ca_and_leaf(dir: &Path, ca: &str, leaf: &str, spec: &LeafSpec<'_>) -> Result<(), Error> {
    let now = OffsetDateTime::now_utc();
    let (ca_crt_path, ca_key_path) = (dir.join(format!("{ca}.crt")), dir.join(format!("{ca}.key")));
    let (ca_crt, ca_key) = match (std::fs::read(&ca_crt_path), std::fs::read(&ca_key_path)) {
        (Ok(c), Ok(k)) if key_matches(&c, &k) => (c, k),
        _ => {
            let (c, k) = new_ca(ca, now)?;
            write_atomic(&ca_key_path, k.as_bytes())?;
            write_atomic(&ca_crt_path, c.as_bytes())?;
            (c.into_bytes(), k.into_bytes())
        }
    };
    let (crt_path, key_path) = (
        dir.join(format!("{leaf}.crt")),
        dir.join(format!("{leaf}.key")),
    );
    let usable = match (std::fs::read(&crt_path), std::fs::read(&key_path)) {
        (Ok(c), Ok(k)) => cert_fresh_and_issued_by(&c, &ca_crt, now) && key_matches(&c, &k),
        _ => false,
    };
    if !usable {
        let (c, k) = issue(&issuer(&ca_crt, &ca_key)?, spec, now)?;
        write_atomic(&key_path, k.as_bytes())?;
        write_atomic(&crt_path, c.as_bytes())?;
    }
    Ok(())
}

/// A parsed CSR whose self-signature checked out (proof the sender holds the key), and the
/// hash of its key.
pub struct Csr {
    params: rcgen::CertificateSigningRequestParams,
    /// Hex sha256 of the requested key's SubjectPublicKeyInfo.
    pub key_sha256: String,
}

impl Csr {
    /// Parses a PEM CSR; a bad signature or shape is an error a person can read.
    pub fn parse(pem: &str) -> Result<Csr, String> {
        use sha2::{Digest, Sha256};
        use x509_parser::prelude::FromDer;
        let params = rcgen::CertificateSigningRequestParams::from_pem(pem)
            .map_err(|e| format!("the CSR does not parse or its signature is wrong: {e}"))?;
        if params.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err("the CSR's key must be ECDSA P-256".into());
        }
        let (_, p) =
            parse_x509_pem(pem.as_bytes()).map_err(|e| format!("the CSR is not PEM: {e}"))?;
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&p.contents)
                .map_err(|e| format!("the CSR does not parse: {e}"))?;
        Ok(Csr {
            params,
            key_sha256: hex::encode(Sha256::digest(
                req.certification_request_info.subject_pki.raw,
            )),
        })
    }
}

/// Signs `csr` as a client certificate for `cn` valid for `lifetime` from `now` (backdated
/// five minutes): what the CSR asked for — names, usages, CA bits — is ignored, only its key
/// is used. Returns the PEM and the hex sha256 of the DER.
pub fn sign_client_csr(
    ca_cert: &str,
    ca_key: &str,
    csr: &Csr,
    cn: &str,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<(String, String), Error> {
    use sha2::{Digest, Sha256};
    let key = KeyPair::from_pem(ca_key).map_err(Error::pki("load CA key"))?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert, key).map_err(Error::pki("load CA certificate"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn, &[]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + lifetime;
    let req = rcgen::CertificateSigningRequestParams {
        params,
        public_key: csr.params.public_key.clone(),
    };
    let cert = req.signed_by(&issuer).map_err(Error::pki("sign a CSR"))?;
    Ok((cert.pem(), hex::encode(Sha256::digest(cert.der()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// The pin must equal what kubeadm's documentation computes with openssl:
    /// `openssl x509 -pubkey | openssl pkey -pubin -outform der | sha256sum`.
    #[test]
    fn ca_hash_matches_openssl_pipeline() {
        let (ca, _) = new_ca("pin-test", now()).unwrap();
        let ours = ca_hash(ca.as_bytes()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, &ca).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -pubkey -noout -in {} | openssl pkey -pubin -outform der | sha256sum",
                path.display()
            ))
            .output()
            .expect("openssl is installed");
        assert!(out.status.success());
        let theirs = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            ours,
            format!("sha256:{}", theirs.split_whitespace().next().unwrap())
        );
        assert_eq!(ours.len(), "sha256:".len() + 64);
    }

    #[test]
    fn ca_hash_rejects_garbage() {
        assert!(ca_hash(b"not a cert").is_err());
    }

    fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        ["ca.crt", "ca.key", "l.crt", "l.key"]
            .iter()
            .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
            .collect()
    }

    #[test]
    fn ca_and_leaf_are_made_once_and_survive_torn_writes() {
        let leaf = LeafSpec::client("root", &[]);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca_and_leaf(d, "ca", "l", &leaf).unwrap();
        let first = files(d);
        ca_and_leaf(d, "ca", "l", &leaf).unwrap();
        assert_eq!(files(d), first, "a second run must change nothing");

        // Killed between the CA's two writes: certificate without key.
        std::fs::remove_file(d.join("ca.key")).unwrap();
        ca_and_leaf(d, "ca", "l", &leaf).expect("a torn CA is remade, not an error");
        let now = files(d);
        assert!(key_matches(&now["ca.crt"], &now["ca.key"]));
        assert!(cert_fresh_and_issued_by(
            &now["l.crt"],
            &now["ca.crt"],
            OffsetDateTime::now_utc()
        ));
        assert!(key_matches(&now["l.crt"], &now["l.key"]));

        // Killed between the leaf's two writes: a new key next to the old certificate.
        let (_, other_key) = new_ca("x", OffsetDateTime::now_utc()).unwrap();
        std::fs::write(d.join("l.key"), other_key).unwrap();
        ca_and_leaf(d, "ca", "l", &leaf).unwrap();
        let after = files(d);
        assert!(key_matches(&after["l.crt"], &after["l.key"]));
        assert_eq!(after["ca.crt"], now["ca.crt"], "a torn leaf keeps its CA");
    }
}
