//! The CA pin: `sha256:<hex>` of a CA certificate's DER SubjectPublicKeyInfo, the value
//! `kubeadm join --discovery-token-ca-cert-hash` takes (kubeadm hashes
//! `x509.Certificate.RawSubjectPublicKeyInfo`). A node's first contact with the machine API
//! trusts exactly the CA whose key hashes to the pin it booted with.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, Result};

/// A pinned CA public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin([u8; 32]);

impl CaPin {
    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> CaPin {
        CaPin(Sha256::digest(spki_der).into())
    }

    /// The pin of a DER certificate's public key.
    pub fn of_certificate_der(der: &[u8]) -> Result<CaPin> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
        Ok(CaPin::of_spki(cert.tbs_certificate.subject_pki.raw))
    }

    /// The pin of the first certificate in a PEM text.
    pub fn of_certificate_pem(pem: &[u8]) -> Result<CaPin> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
            .map_err(|e| Error::Certificate(format!("not PEM: {e}")))?;
        CaPin::of_certificate_der(&pem.contents)
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

/// Accepts `sha256:` and 64 hex digits (any case).
impl FromStr for CaPin {
    type Err = Error;

    fn from_str(s: &str) -> Result<CaPin> {
        let bad = || Error::invalid("CA pin", s, "must be sha256:<64 hex digits>");
        let hex_part = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex_part.len() != 64 {
            return Err(bad());
        }
        let bytes = hex::decode(hex_part).map_err(|_| bad())?;
        Ok(CaPin(bytes.try_into().map_err(|_| bad())?))
    }
}

crate::serde_as_text!(CaPin);

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn pin_is_the_spki_hash_whatever_the_encoding() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let want = CaPin::of_spki(&key.subject_public_key_info());
        assert_eq!(CaPin::of_certificate_der(cert.der()).unwrap(), want);
        assert_eq!(
            CaPin::of_certificate_pem(cert.pem().as_bytes()).unwrap(),
            want
        );
        // A second certificate for the same key has the same pin (that is what a pin is).
        let again = rcgen::CertificateParams::new(vec!["other".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(CaPin::of_certificate_der(again.der()).unwrap(), want);
        let text = want.to_string();
        assert!(text.starts_with("sha256:") && text.len() == 71);
        assert_eq!(text.parse::<CaPin>().unwrap(), want);
        assert_eq!(
            text.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<CaPin>()
                .unwrap(),
            want
        );
    }

    #[test]
    fn bad_pins_and_certificates() {
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &format!("sha256:{}", "0".repeat(63)),
            &format!("sha256:{}", "g".repeat(64)),
            &format!("sha256:{} ", "0".repeat(64)),
            &format!("SHA256:{}", "0".repeat(64)),
        ] {
            assert!(bad.parse::<CaPin>().is_err(), "{bad:?}");
        }
        assert!(CaPin::of_certificate_der(b"garbage").is_err());
        assert!(CaPin::of_certificate_pem(b"garbage").is_err());
    }
}
