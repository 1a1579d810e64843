//! `manifest.json` (what an image is: version, every artifact's size and sha256, the kernel
//! command line, the verity parameters, the exact package versions) and its ed25519
//! signature `manifest.sig`.
//!
//! The manifest is rendered canonically (sorted keys, two-space indent, trailing newline) so
//! the same image always has the same manifest bytes, and ed25519 signatures are
//! deterministic, so the signature is reproducible too. Keys are 32-byte ed25519 seeds and
//! public keys, stored as one line of standard base64: short enough to paste into a
//! config, and the public half is baked into the image at [`PUBLIC_KEY_PATH`].

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where the image's trusted public key lives inside the rootfs.
pub const PUBLIC_KEY_PATH: &str = "usr/share/tether/image-signing.pub";

/// One artifact as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactDigest {
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// dm-verity parameters of the rootfs (the hash tree is appended to the rootfs file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verity {
    /// Root hash, hex.
    pub root_hash: String,
    /// Byte offset of the hash tree in the rootfs file (= size of the file system).
    pub hash_offset: u64,
    /// Salt, hex (derived from the image, so builds are reproducible).
    pub salt: String,
    /// Hash algorithm.
    pub algorithm: String,
}

/// The signed description of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Image version from the spec.
    pub version: String,
    /// Kernel release (`6.1.0-28-amd64`).
    pub kernel_release: String,
    /// Rootfs file system type.
    pub rootfs_format: String,
    /// The full kernel command line for a PXE boot.
    pub cmdline: String,
    /// dm-verity parameters.
    pub verity: Verity,
    /// Artifacts by file name.
    pub artifacts: BTreeMap<String, ArtifactDigest>,
    /// Installed Debian packages and their versions.
    pub packages: BTreeMap<String, String>,
    /// The SOURCE_DATE_EPOCH the image was built with.
    pub source_date_epoch: u64,
}

impl Manifest {
    /// Canonical bytes: what is signed and written.
    pub fn render(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("manifest serializes");
        out.push(b'\n');
        out
    }
}

/// Makes a new key pair from the OS's random source: (secret seed, public key), base64.
pub fn generate_keypair() -> Result<(String, String)> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Key {
        path: "<random>".into(),
        reason: format!("no randomness: {e}"),
    })?;
    let key = SigningKey::from_bytes(&seed);
    Ok((
        B64.encode(key.to_bytes()),
        B64.encode(key.verifying_key().to_bytes()),
    ))
}

/// Writes `signing.key` (mode 0600) and `signing.pub` into `dir`; refuses to overwrite.
pub fn keygen(dir: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let (secret, public) = generate_keypair()?;
    let key_path = dir.join("signing.key");
    let pub_path = dir.join("signing.pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(Error::Key {
                path: p.clone(),
                reason: "already exists; not overwriting a key".into(),
            });
        }
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(Error::io("create", &key_path))?;
    writeln!(f, "{secret}").map_err(Error::io("write", &key_path))?;
    fs::write(&pub_path, format!("{public}\n")).map_err(Error::io("write", &pub_path))?;
    Ok(())
}

fn decode32(text: &str, path: &Path) -> Result<[u8; 32]> {
    let bytes = B64.decode(text.trim()).map_err(|e| Error::Key {
        path: path.to_path_buf(),
        reason: format!("not base64: {e}"),
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| Error::Key {
        path: path.to_path_buf(),
        reason: format!("{} bytes, an ed25519 key has 32", b.len()),
    })
}

/// Parses a signing key (base64 seed) read from `path`.
pub fn parse_signing_key(text: &str, path: &Path) -> Result<SigningKey> {
    Ok(SigningKey::from_bytes(&decode32(text, path)?))
}

/// Parses a public key (base64) read from `path`.
pub fn parse_public_key(text: &str, path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&decode32(text, path)?).map_err(|e| Error::Key {
        path: path.to_path_buf(),
        reason: format!("not an ed25519 point: {e}"),
    })
}

/// Reads a signing key file.
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let text = fs::read_to_string(path).map_err(Error::io("read key", path))?;
    parse_signing_key(&text, path)
}

/// The base64 signature of `message` (what `manifest.sig` holds, without the newline).
pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    B64.encode(key.sign(message).to_bytes())
}

/// Checks a base64 signature of `message`.
pub fn verify(public: &VerifyingKey, message: &[u8], signature: &str) -> Result<()> {
    let bytes = B64
        .decode(signature.trim())
        .map_err(|e| Error::Verify(format!("signature is not base64: {e}")))?;
    let sig = Signature::from_slice(&bytes)
        .map_err(|e| Error::Verify(format!("malformed signature: {e}")))?;
    public
        .verify(message, &sig)
        .map_err(|_| Error::Verify("manifest signature does not match the public key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: "1.0".into(),
            kernel_release: "6.1.0-28-amd64".into(),
            rootfs_format: "squashfs".into(),
            cmdline: "console=ttyS0".into(),
            verity: Verity {
                root_hash: "ab".into(),
                hash_offset: 4096,
                salt: "00".into(),
                algorithm: "sha256".into(),
            },
            artifacts: [
                (
                    "vmlinuz".to_string(),
                    ArtifactDigest {
                        size: 2,
                        sha256: "x".into(),
                    },
                ),
                (
                    "initramfs".to_string(),
                    ArtifactDigest {
                        size: 1,
                        sha256: "y".into(),
                    },
                ),
            ]
            .into(),
            packages: [("systemd".to_string(), "252".to_string())].into(),
            source_date_epoch: 1,
        }
    }

    #[test]
    fn render_is_canonical() {
        let text = String::from_utf8(manifest().render()).unwrap();
        assert!(text.ends_with("}\n"));
        assert!(text.find("\"initramfs\"").unwrap() < text.find("\"vmlinuz\"").unwrap());
        assert!(text.contains("\"rootHash\": \"ab\""));
        assert_eq!(manifest().render(), manifest().render());
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, manifest());
    }

    #[test]
    fn sign_and_verify() {
        let (secret, public) = generate_keypair().unwrap();
        let p = Path::new("k");
        let key = parse_signing_key(&secret, p).unwrap();
        let public = parse_public_key(&public, p).unwrap();
        let msg = manifest().render();
        let sig = sign(&key, &msg);
        assert_eq!(sig, sign(&key, &msg), "ed25519 is deterministic");
        verify(&public, &msg, &sig).unwrap();

        let mut tampered = msg.clone();
        tampered[10] ^= 1;
        let cases: &[(&[u8], &str, &str)] = &[
            (&tampered, &sig, "does not match"),
            (&msg, "!!", "not base64"),
            (&msg, "AAAA", "malformed signature"),
        ];
        for (m, s, want) in cases {
            let err = verify(&public, m, s).unwrap_err().to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let (_, other) = generate_keypair().unwrap();
        let other = parse_public_key(&other, p).unwrap();
        assert!(verify(&other, &msg, &sig).is_err(), "another key rejects");
    }

    #[test]
    fn bad_keys() {
        let p = Path::new("k");
        let cases = [("%%%", "not base64"), ("AAAA", "3 bytes")];
        for (text, want) in cases {
            let err = parse_signing_key(text, p).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn keygen_writes_pair_and_refuses_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        keygen(dir.path()).unwrap();
        let key = read_signing_key(&dir.path().join("signing.key")).unwrap();
        let public = fs::read_to_string(dir.path().join("signing.pub")).unwrap();
        assert_eq!(
            parse_public_key(&public, Path::new("p")).unwrap(),
            key.verifying_key()
        );
        let mode = fs::metadata(dir.path().join("signing.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = keygen(dir.path()).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(
            read_signing_key(&dir.path().join("signing.key"))
                .unwrap()
                .to_bytes(),
            key.to_bytes()
        );
    }
}
