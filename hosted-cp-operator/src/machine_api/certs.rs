//! The machine API's own CA and what it signs.
//!
//! The CA lives in the Secret [`CA_SECRET`] in the operator's namespace, created once
//! (create, not apply: two operators starting together keep the first one's CA) and kept
//! across restarts, so every node's pin stays valid. The serving certificate is issued from
//! it at each start for the addresses nodes use. Machine certificates are signed from the
//! node's CSR: the node's key never leaves it, the CN is `tether:machine:<name>` whatever
//! the CSR asked for, usage client-auth only, backdated five minutes for clock skew.

use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};
use tether_api::machine_api::{CA_SECRET, MACHINE_CN_PREFIX};
use tether_boot::CaPin;
use time::{Duration, OffsetDateTime};

use crate::error::Error;
use crate::x509::{self, Csr, LeafSpec};

/// The machine API CA: certificate and key, PEM.
#[derive(Clone)]
pub struct Ca {
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

impl Ca {
    /// The pin nodes are given.
    pub fn pin(&self) -> Result<CaPin, Error> {
        CaPin::of_certificate_pem(self.cert_pem.as_bytes()).map_err(|e| Error::Pki {
            what: "pin of the machine API CA",
            detail: e.to_string(),
        })
    }

    /// Loads the CA from its Secret, creating it on first use.
    pub async fn ensure(secrets: &Api<Secret>) -> Result<Ca, Error> {
        if let Some(ca) = Self::load(secrets).await? {
            return Ok(ca);
        }
        let (cert_pem, key_pem) = x509::new_ca("tether-machine-api", OffsetDateTime::now_utc())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    ("tls.crt", cert_pem.as_bytes()),
                    ("tls.key", key_pem.as_bytes()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect(),
            ),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(Ca { cert_pem, key_pem }),
            // Another operator made it first: use theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => Self::load(secrets)
                .await?
                .ok_or_else(|| Error::Invalid(format!("Secret {CA_SECRET} vanished"))),
            Err(e) => Err(Error::kube(format!("create Secret {CA_SECRET}"))(e)),
        }
    }

    async fn load(secrets: &Api<Secret>) -> Result<Option<Ca>, Error> {
        let Some(s) = secrets
            .get_opt(CA_SECRET)
            .await
            .map_err(Error::kube(format!("get Secret {CA_SECRET}")))?
        else {
            return Ok(None);
        };
        let get = |k: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| Error::Invalid(format!("Secret {CA_SECRET} has no {k}")))
        };
        let ca = Ca {
            cert_pem: get("tls.crt")?,
            key_pem: get("tls.key")?,
        };
        if !x509::key_matches(ca.cert_pem.as_bytes(), ca.key_pem.as_bytes()) {
            return Err(Error::Invalid(format!(
                "Secret {CA_SECRET}: the key does not belong to the certificate"
            )));
        }
        Ok(Some(ca))
    }

    /// A serving certificate for the API's host names and addresses: `(cert PEM with the
    /// CA appended, key PEM)`. The chain carries the CA so a node can match its pin.
    pub fn serving(&self, dns: &[String], ips: &[IpAddr]) -> Result<(String, String), Error> {
        let (cert, key) = x509::issue_with(
            self.cert_pem.as_bytes(),
            self.key_pem.as_bytes(),
            &LeafSpec::server("tether-machine-api", dns, ips),
            OffsetDateTime::now_utc(),
        )?;
        Ok((format!("{cert}{}", self.cert_pem), key))
    }

    /// Signs a node's CSR as the certificate of `machine` (CN `tether:machine:<name>`).
    pub fn sign(
        &self,
        csr: &Csr,
        machine: &str,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, Error> {
        let (pem, sha256) = x509::sign_client_csr(
            &self.cert_pem,
            &self.key_pem,
            csr,
            &format!("{MACHINE_CN_PREFIX}{machine}"),
            lifetime,
            now,
        )?;
        Ok(Issued {
            pem,
            sha256,
            not_after: now + lifetime,
        })
    }
}

/// A signed machine certificate.
pub struct Issued {
    /// PEM.
    pub pem: String,
    /// Hex sha256 of the DER.
    pub sha256: String,
    /// Expiry.
    pub not_after: OffsetDateTime,
}

/// What the TLS layer learned about a client certificate (already verified against the CA).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The Machine its CN names, if it is a machine certificate.
    pub machine: Option<String>,
    /// Hex sha256 of its DER.
    pub sha256: String,
    /// The address the connection came from.
    pub remote: Option<std::net::IpAddr>,
}

impl Peer {
    /// From the DER of a verified client certificate.
    pub fn from_der(der: &[u8]) -> Peer {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let machine = X509Certificate::from_der(der).ok().and_then(|(_, c)| {
            c.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .and_then(|cn| cn.strip_prefix(MACHINE_CN_PREFIX))
                .map(str::to_string)
        });
        Peer {
            machine,
            sha256: hex::encode(Sha256::digest(der)),
            remote: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn ca() -> Ca {
        let (cert_pem, key_pem) = x509::new_ca("t", OffsetDateTime::now_utc()).unwrap();
        Ca { cert_pem, key_pem }
    }

    #[test]
    fn signs_what_the_server_decides_not_what_the_csr_asks() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        asked
            .distinguished_name
            .push(DnType::CommonName, "system:masters");
        asked.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr_pem = asked.serialize_request(&key).unwrap().pem().unwrap();
        let csr = Csr::parse(&csr_pem).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(
            csr.key_sha256,
            hex::encode(Sha256::digest(key.subject_public_key_info()))
        );
        let now = OffsetDateTime::now_utc();
        let issued = ca
            .sign(&csr, "mac-525400000001", Duration::days(30), now)
            .unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(issued.pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let peer = Peer::from_der(&p.contents);
        assert_eq!(peer.machine.as_deref(), Some("mac-525400000001"));
        assert_eq!(peer.sha256, issued.sha256);
        assert!(!cert.is_ca());
        assert!(
            cert.subject_alternative_name().unwrap().is_none(),
            "no SANs carried over"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(
            cert.validity().not_before.timestamp() <= (now - Duration::minutes(5)).unix_timestamp()
        );
        assert!(x509::cert_fresh_and_issued_by(
            issued.pem.as_bytes(),
            ca.cert_pem.as_bytes(),
            now
        ));
    }

    #[test]
    fn bad_csrs_are_refused() {
        assert!(Csr::parse("garbage").is_err());
        // A CSR whose signature does not match its key.
        let key = KeyPair::generate().unwrap();
        let pem = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let mut der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let n = der.len();
        der[n - 5] ^= 0xff;
        let bad = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        );
        assert!(Csr::parse(&bad).is_err());
    }

    #[test]
    fn serving_chain_carries_the_ca() {
        let ca = ca();
        let (chain, _) = ca
            .serving(&["localhost".into()], &["10.0.0.1".parse().unwrap()])
            .unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    }
}
