//! The machine's identity in its state directory: its private key (generated here, 0600,
//! never sent anywhere) and the certificate the machine API issued for it.
//!
//! | file | written | meaning |
//! |---|---|---|
//! | `machine.key` | before the first CSR is sent | the key; a restart re-sends a CSR for the *same* key, which the API answers idempotently |
//! | `machine.json` | after the API answered | `{machine, certificate, ca}`: enrolled |
//! | `machine.key.new` | before a renewal CSR is sent | the next key; promoted once its certificate is saved |
//!
//! Every write is atomic ([`crate::fs::write_atomic`]). [`StateDir::load`] repairs the one
//! torn state a crash can leave: a saved renewal certificate whose key is still
//! `machine.key.new`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, Result};
use crate::fs::write_atomic;

/// The default state directory (tmpfs on diskless nodes, the state partition on disk
/// installs).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether";

/// What `machine.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The machine API it enrolled with (a restart needs no seed to find it again).
    pub api: String,
    /// The Machine this node is.
    pub machine: String,
    /// Its certificate (PEM).
    pub certificate: String,
    /// The machine API CA (PEM).
    pub ca: String,
    /// When this node saved the certificate (Unix seconds; set by [`StateDir::save`]):
    /// certificates are backdated for clock skew, so renewal counts from here.
    #[serde(default)]
    pub received: u64,
}

/// A loaded identity: what is on disk plus the key.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Machine name, certificate and CA.
    pub enrolled: Enrolled,
    /// The private key (PEM).
    pub key_pem: String,
    /// Certificate validity, for renewal.
    pub not_before: SystemTime,
    /// Certificate expiry.
    pub not_after: SystemTime,
}

impl Identity {
    /// When to renew: two thirds into the certificate's life as this node received it.
    pub fn renew_at(&self) -> SystemTime {
        let received = SystemTime::UNIX_EPOCH + Duration::from_secs(self.enrolled.received);
        renew_at(self.not_before.max(received), self.not_after)
    }
}

/// Two thirds into `[start, not_after]`.
pub fn renew_at(start: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(start).unwrap_or(Duration::ZERO);
    start + life * 2 / 3
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

const KEY: &str = "machine.key";
const NEW_KEY: &str = "machine.key.new";
const ENROLLED: &str = "machine.json";

impl StateDir {
    /// `dir` (created on first write, 0700).
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ensure_dir(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(Error::io("create", &self.dir))
    }

    /// The machine key, generated and saved (0600) the first time.
    pub fn key(&self) -> Result<KeyPair> {
        self.key_at(KEY)
    }

    /// The next key for a renewal, generated and saved the first time.
    pub fn next_key(&self) -> Result<KeyPair> {
        self.key_at(NEW_KEY)
    }

    fn key_at(&self, name: &str) -> Result<KeyPair> {
        let path = self.file(name);
        match std::fs::read_to_string(&path) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| Error::BadInput {
                source_name: path.display().to_string(),
                detail: format!("not a private key: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.ensure_dir()?;
                let key = KeyPair::generate().map_err(|e| Error::Crypto {
                    what: "generate the machine key",
                    detail: e.to_string(),
                })?;
                write_atomic(&path, key.serialize_pem().as_bytes(), 0o600)?;
                Ok(key)
            }
            Err(e) => Err(Error::io("read", &path)(e)),
        }
    }

    /// The identity, if the machine is enrolled. A `machine.json` whose certificate does not
    /// belong to `machine.key` is finished (torn renewal) or ignored (anything else).
    pub fn load(&self) -> Result<Option<Identity>> {
        let path = self.file(ENROLLED);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path)(e)),
        };
        let Ok(enrolled) = serde_json::from_str::<Enrolled>(&text) else {
            tracing::warn!("{} does not parse; enrolling again", path.display());
            return Ok(None);
        };
        let cert = CertFacts::parse(&enrolled.certificate)?;
        for name in [KEY, NEW_KEY] {
            let Ok(key_pem) = std::fs::read_to_string(self.file(name)) else {
                continue;
            };
            let Ok(key) = KeyPair::from_pem(&key_pem) else {
                continue;
            };
            if spki_sha256(&key) == cert.key_sha256 {
                if name == NEW_KEY {
                    // Killed between saving the renewed certificate and promoting its key.
                    std::fs::rename(self.file(NEW_KEY), self.file(KEY))
                        .map_err(Error::io("promote", self.file(NEW_KEY)))?;
                }
                return Ok(Some(Identity {
                    enrolled,
                    key_pem,
                    not_before: cert.not_before,
                    not_after: cert.not_after,
                }));
            }
        }
        tracing::warn!("the saved certificate belongs to no key here; enrolling again");
        Ok(None)
    }

    /// Saves what the API issued for `key` (the current or the next key).
    pub fn save(&self, enrolled: &Enrolled, key: &KeyPair) -> Result<Identity> {
        let cert = CertFacts::parse(&enrolled.certificate)?;
        if cert.key_sha256 != spki_sha256(key) {
            return Err(Error::Crypto {
                what: "check the issued certificate",
                detail: "it is not for the key this node sent".into(),
            });
        }
        self.ensure_dir()?;
        let mut enrolled = enrolled.clone();
        enrolled.received = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let json = serde_json::to_vec_pretty(&enrolled).expect("strings serialize");
        write_atomic(&self.file(ENROLLED), &json, 0o600)?;
        if self.file(NEW_KEY).exists()
            && std::fs::read_to_string(self.file(NEW_KEY)).ok().as_deref()
                == Some(key.serialize_pem().as_str())
        {
            std::fs::rename(self.file(NEW_KEY), self.file(KEY))
                .map_err(Error::io("promote", self.file(NEW_KEY)))?;
        }
        Ok(Identity {
            enrolled,
            key_pem: key.serialize_pem(),
            not_before: cert.not_before,
            not_after: cert.not_after,
        })
    }

    /// Drops the identity — enrollment *and* keys — because the API no longer accepts its
    /// certificate (the Machine was deleted): a new enrollment proves a new key, so a replay
    /// cannot bring back what an administrator removed.
    pub fn forget(&self) -> Result<()> {
        // Keys first: a kill half-way leaves an enrollment without its key, which `load`
        // ignores — never the old key, which a new enrollment would replay.
        for name in [KEY, NEW_KEY, ENROLLED] {
            match std::fs::remove_file(self.file(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", self.file(name))(e)),
            }
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io("sync", &self.dir))
    }

    /// Drops only the saved enrollment, keeping the key (what a crash before the save leaves;
    /// tests use it to stand in for one).
    pub fn forget_enrollment(&self) -> Result<()> {
        match std::fs::remove_file(self.file(ENROLLED)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", self.file(ENROLLED))(e)),
        }
    }
}

/// Hex sha256 of a key's SubjectPublicKeyInfo: what the API records per enrollment.
pub fn spki_sha256(key: &KeyPair) -> String {
    hex::encode(Sha256::digest(key.subject_public_key_info()))
}

/// A PKCS#10 CSR (PEM) for `key`. The subject is a placeholder: the API decides the name.
pub fn csr(key: &KeyPair) -> Result<String> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tether-agent");
    params
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| Error::Crypto {
            what: "make the CSR",
            detail: e.to_string(),
        })
}

/// What the agent needs to know of a certificate.
#[derive(Debug, Clone)]
pub struct CertFacts {
    /// Start of validity.
    pub not_before: SystemTime,
    /// Expiry.
    pub not_after: SystemTime,
    /// Hex sha256 of its SubjectPublicKeyInfo.
    pub key_sha256: String,
}

impl CertFacts {
    /// Parses the first certificate of a PEM text.
    pub fn parse(pem: &str) -> Result<CertFacts> {
        let bad = |detail: String| Error::Crypto {
            what: "parse the machine certificate",
            detail,
        };
        let (_, p) =
            x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let (_, cert) = X509Certificate::from_der(&p.contents).map_err(|e| bad(e.to_string()))?;
        let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Ok(CertFacts {
            not_before: at(cert.validity().not_before.timestamp()),
            not_after: at(cert.validity().not_after.timestamp()),
            key_sha256: hex::encode(Sha256::digest(cert.tbs_certificate.subject_pki.raw)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `key`, valid for `days` from now (what the API would issue).
    fn issue(key: &KeyPair, days: i64) -> String {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(vec![]).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        p.signed_by(key, &issuer).unwrap().pem()
    }

    #[test]
    fn key_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::new(t.path().join("state"));
        let k1 = s.key().unwrap();
        let k2 = s.key().unwrap();
        assert_eq!(k1.serialize_pem(), k2.serialize_pem());
        let mode = std::fs::metadata(t.path().join("state/machine.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(t.path().join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(
            s.load().unwrap().is_none(),
            "a key alone is not an enrollment"
        );
    }

    #[test]
    fn save_load_forget() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::new(t.path());
        let key = s.key().unwrap();
        let e = Enrolled {
            api: "https://10.0.0.1:9443".into(),
            machine: "mac-525400000001".into(),
            certificate: issue(&key, 30),
            ca: "CA".into(),
            received: 0,
        };
        let id = s.save(&e, &key).unwrap();
        let loaded = s.load().unwrap().unwrap();
        assert_eq!(loaded.enrolled, id.enrolled);
        assert_eq!(
            Enrolled {
                received: 0,
                ..loaded.enrolled.clone()
            },
            e
        );
        assert_eq!(loaded.not_after, id.not_after);
        // Renewal counts from receipt, not from the backdated notBefore.
        let received = SystemTime::UNIX_EPOCH + Duration::from_secs(id.enrolled.received);
        assert!(id.not_before < received, "the certificate is backdated");
        let life = id.not_after.duration_since(received).unwrap();
        assert_eq!(id.renew_at(), received + life * 2 / 3);
        // A certificate for another key is refused and changes nothing.
        let other = KeyPair::generate().unwrap();
        let bad = Enrolled {
            certificate: issue(&other, 30),
            ..e.clone()
        };
        assert!(s.save(&bad, &key).is_err());
        assert_eq!(s.load().unwrap().unwrap().enrolled, id.enrolled);
        s.forget_enrollment().unwrap();
        assert!(s.load().unwrap().is_none());
        assert_eq!(
            s.key().unwrap().serialize_pem(),
            key.serialize_pem(),
            "the key stays"
        );
        s.forget().unwrap();
        assert!(s.load().unwrap().is_none());
        assert_ne!(
            s.key().unwrap().serialize_pem(),
            key.serialize_pem(),
            "a new key after forget"
        );
        s.forget().unwrap();
    }

    #[test]
    fn a_torn_renewal_is_finished_on_load() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::new(t.path());
        let old = s.key().unwrap();
        let e = Enrolled {
            api: "https://a".into(),
            machine: "m".into(),
            certificate: issue(&old, 30),
            ca: "CA".into(),
            received: 0,
        };
        s.save(&e, &old).unwrap();
        let next = s.next_key().unwrap();
        // Killed after writing machine.json for the next key, before the rename.
        let renewed = Enrolled {
            certificate: issue(&next, 30),
            ..e.clone()
        };
        write_atomic(
            &t.path().join(ENROLLED),
            &serde_json::to_vec(&renewed).unwrap(),
            0o600,
        )
        .unwrap();
        let loaded = s.load().unwrap().unwrap();
        assert_eq!(loaded.enrolled, renewed);
        assert_eq!(s.key().unwrap().serialize_pem(), next.serialize_pem());
        assert!(!t.path().join(NEW_KEY).exists());
    }

    #[test]
    fn csr_carries_the_key() {
        let key = KeyPair::generate().unwrap();
        let pem = csr(&key).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let params = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert!(
            key.subject_public_key_info()
                .ends_with(params.public_key.der_bytes())
        );
    }

    #[test]
    fn renewal_point() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(300)),
            t0 + Duration::from_secs(200)
        );
        assert_eq!(renew_at(t0, t0), t0);
    }
}
