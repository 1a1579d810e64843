//! TLS to the machine API. First contact is pinned: the server's chain must contain a
//! certificate whose public key hashes to the pin the node booted with (kubeadm's discovery
//! hash), and the leaf must verify against *that* certificate as the only root — name and
//! validity included. Anything else fails the handshake, so the token is never sent to a
//! server that is not the pinned one. After enrollment the node trusts the CA it received
//! (which matched the pin) and presents its machine certificate.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tether_boot::CaPin;

use crate::error::{Error, Result};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies a server against a pinned CA; remembers why it refused.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: CaPin,
    refusal: Mutex<Option<String>>,
}

impl PinnedVerifier {
    /// A verifier for `pin`.
    pub fn new(pin: CaPin) -> Arc<PinnedVerifier> {
        Arc::new(PinnedVerifier {
            pin,
            refusal: Mutex::new(None),
        })
    }

    /// Why the last handshake was refused for the pin, if it was.
    pub fn refusal(&self) -> Option<String> {
        self.refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refuse(&self, why: String) -> rustls::Error {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        rustls::Error::General(why)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let mut seen = Vec::new();
        for der in intermediates.iter().chain(std::iter::once(end_entity)) {
            let Ok(pin) = CaPin::of_certificate_der(der) else {
                continue;
            };
            if pin != self.pin {
                seen.push(pin.to_string());
                continue;
            }
            let mut roots = RootCertStore::empty();
            roots
                .add(der.clone())
                .map_err(|e| self.refuse(format!("the pinned CA is unusable: {e}")))?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| self.refuse(format!("the pinned CA is unusable: {e}")))?;
            return webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map_err(|e| {
                    self.refuse(format!(
                        "the server certificate does not verify against the pinned CA: {e}"
                    ))
                });
        }
        Err(self.refuse(format!(
            "no certificate in the server's chain matches the pin {} (it presented {})",
            self.pin,
            if seen.is_empty() {
                "none that parse".to_string()
            } else {
                seen.join(", ")
            }
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The first-contact config: pinned, no client certificate.
pub fn pinned(verifier: Arc<PinnedVerifier>) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(crypto("TLS versions"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The enrolled config: trust `ca_pem`, present `cert_pem` with `key_pem`.
pub fn mutual(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in pem_certs(ca_pem)? {
        roots.add(ca).map_err(crypto("trust the machine API CA"))?;
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(crypto("read the machine key"))?;
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(crypto("TLS versions"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(pem_certs(cert_pem)?, key)
        .map_err(crypto("use the machine certificate"))
}

/// The config of a client that speaks plain HTTP (NoCloud seeds, the artifact store, whose
/// content is checked by digest): it trusts no certificate, so an `https://` URL fails
/// instead of being trusted by accident — and reqwest needs a config to build a client at
/// all without a process-wide crypto provider.
pub fn trusts_nothing() -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(crypto("TLS versions"))?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

/// Every certificate in a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(crypto("read PEM certificates"))?;
    if certs.is_empty() {
        return Err(Error::Crypto {
            what: "read PEM certificates",
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn crypto<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Crypto {
        what,
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    struct Ca {
        der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn leaf(by: &Ca, ip: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.subject_alt_names = vec![SanType::IpAddress(ip.parse().unwrap())];
        p.signed_by(&key, &by.issuer).unwrap().der().clone()
    }

    fn verify(
        pin: CaPin,
        end: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
    ) -> Result<(), String> {
        let v = PinnedVerifier::new(pin);
        let name = ServerName::IpAddress(rustls::pki_types::IpAddr::from(
            "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
        ));
        v.verify_server_cert(end, rest, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| {
                assert!(
                    v.refusal().is_some(),
                    "a refusal is remembered for the error"
                );
                e.to_string()
            })
    }

    #[test]
    fn only_the_pinned_ca_and_a_leaf_it_signed_for_this_name_pass() {
        let pinned = ca("pinned");
        let other = ca("other");
        let pin = CaPin::of_certificate_der(&pinned.der).unwrap();
        let good = leaf(&pinned, "10.0.0.1");
        assert_eq!(
            verify(pin, &good, std::slice::from_ref(&pinned.der)),
            Ok(())
        );

        // Someone else's server, however complete its chain.
        let theirs = leaf(&other, "10.0.0.1");
        let err = verify(pin, &theirs, std::slice::from_ref(&other.der)).unwrap_err();
        assert!(
            err.contains("matches the pin") && err.contains("sha256:"),
            "{err}"
        );
        // The pinned CA is public: presenting it beside a leaf it did not sign is no use.
        let err = verify(pin, &theirs, std::slice::from_ref(&pinned.der)).unwrap_err();
        assert!(
            err.contains("does not verify against the pinned CA"),
            "{err}"
        );
        // A leaf of the pinned CA for another address.
        let elsewhere = leaf(&pinned, "10.0.0.2");
        assert!(verify(pin, &elsewhere, std::slice::from_ref(&pinned.der)).is_err());
        // The CA itself as the server certificate.
        assert!(verify(pin, &pinned.der, &[]).is_err());
    }
}
