//! Throw-away PKI for test clusters: one CA that signs serving and client certificates.
//!
//! ECDSA P-256 keys (rcgen's default) because they are fast to generate and every
//! Kubernetes component accepts them, the service-account signing key included.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{Error, Result};

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl CertPair {
    /// Writes `<dir>/<name>.crt` and `<dir>/<name>.key`; returns both paths.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        fs::write(&crt, &self.cert_pem).map_err(Error::io("write", &crt))?;
        fs::write(&key, &self.key_pem).map_err(Error::io("write", &key))?;
        Ok((crt, key))
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Default)]
pub struct LeafSpec {
    /// Subject common name (the user name for client certificates).
    pub common_name: String,
    /// Subject organizations (the groups for client certificates).
    pub organizations: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ips: Vec<IpAddr>,
    /// Usable as a TLS server certificate.
    pub server: bool,
    /// Usable as a TLS client certificate.
    pub client: bool,
}

impl LeafSpec {
    /// A client certificate for `user` in `groups`.
    pub fn client(user: &str, groups: &[&str]) -> LeafSpec {
        LeafSpec {
            common_name: user.to_string(),
            organizations: groups.iter().map(|g| g.to_string()).collect(),
            client: true,
            ..Default::default()
        }
    }

    /// A serving certificate for loopback (`127.0.0.1`, `localhost`) plus `dns_names`.
    pub fn loopback_server(common_name: &str, dns_names: &[&str]) -> LeafSpec {
        let mut dns: Vec<String> = vec!["localhost".into()];
        dns.extend(dns_names.iter().map(|d| d.to_string()));
        LeafSpec {
            common_name: common_name.to_string(),
            dns_names: dns,
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            server: true,
            ..Default::default()
        }
    }
}

/// A certificate authority that signs leaves.
pub struct Ca {
    pair: CertPair,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Ca> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pair = CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Ca {
            pair,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA's own certificate and key.
    pub fn pair(&self) -> &CertPair {
        &self.pair
    }

    /// Issues a leaf certificate with a fresh key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<CertPair> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&spec.common_name, &spec.organizations);
        params.subject_alt_names = spec
            .dns_names
            .iter()
            .map(|d| Ok(SanType::DnsName(d.clone().try_into()?)))
            .chain(spec.ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, rcgen::Error>>()?;
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
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A key pair for signing service-account tokens: `(private PEM, public PEM)`.
pub fn service_account_key() -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

fn dn(common_name: &str, organizations: &[String]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    for o in organizations {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    dn
}
