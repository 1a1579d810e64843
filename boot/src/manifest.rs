//! `manifest.json` (what an image is: version, every artifact's size and sha256, the kernel
//! command line, the verity parameters, the exact package versions) and its ed25519
//! signature `manifest.sig`.
//!
//! The manifest is rendered canonically (sorted keys, two-space indent, trailing newline) so
//! the same image always has the same manifest bytes, and ed25519 signatures are
//! deterministic, so the signature is reproducible too. Keys are 32-byte ed25519 seeds and
//! public keys, one line of standard base64 each: short enough to paste into a config. The
//! public half is baked into the image at [`PUBLIC_KEY_PATH`]; `tether-image` signs, nodes
//! and the operator verify.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the image's trusted public key lives inside the rootfs.
pub const PUBLIC_KEY_PATH: &str = "usr/share/tether/image-signing.pub";
/// Where the image's version lives inside the rootfs (what the agent reports).
pub const IMAGE_VERSION_PATH: &str = "usr/share/tether/version";
/// The pause image baked into the rootfs, an OCI layout tarball named
/// `registry.k8s.io/pause:<version>` for `ctr images import`: a node starts its first pod
/// without pulling anything.
pub const PAUSE_ARCHIVE_PATH: &str = "usr/share/tether/images/pause.tar";

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

fn decode32(what: &'static str, text: &str) -> Result<[u8; 32]> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| Error::invalid(what, text, format!("not base64: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        Error::invalid(
            what,
            text,
            format!("{} bytes, an ed25519 key has 32", b.len()),
        )
    })
}

/// Parses a signing key (a base64 seed).
pub fn parse_signing_key(text: &str) -> Result<SigningKey> {
    Ok(SigningKey::from_bytes(&decode32("signing key", text)?))
}

/// Parses a public key (base64).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&decode32("public key", text)?)
        .map_err(|e| Error::invalid("public key", text, format!("not an ed25519 point: {e}")))
}

/// The base64 public key of a signing key (what `signing.pub` holds).
pub fn public_key_text(key: &SigningKey) -> String {
    B64.encode(key.verifying_key().to_bytes())
}

/// The base64 seed of a signing key (what `signing.key` holds).
pub fn signing_key_text(key: &SigningKey) -> String {
    B64.encode(key.to_bytes())
}

/// The base64 signature of `message` (what `manifest.sig` holds, without the newline).
pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    B64.encode(key.sign(message).to_bytes())
}

/// Checks a base64 signature of `message`.
pub fn verify(public: &VerifyingKey, message: &[u8], signature: &str) -> Result<()> {
    let bytes = B64
        .decode(signature.trim())
        .map_err(|e| Error::Signature(format!("signature is not base64: {e}")))?;
    let sig = Signature::from_slice(&bytes)
        .map_err(|e| Error::Signature(format!("malformed signature: {e}")))?;
    public
        .verify(message, &sig)
        .map_err(|_| Error::Signature("manifest signature does not match the public key".into()))
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

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
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
        let signing = parse_signing_key(&signing_key_text(&key(7))).unwrap();
        let public = parse_public_key(&public_key_text(&signing)).unwrap();
        let msg = manifest().render();
        let sig = sign(&signing, &msg);
        assert_eq!(sig, sign(&signing, &msg), "ed25519 is deterministic");
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
        let other = key(8).verifying_key();
        assert!(verify(&other, &msg, &sig).is_err(), "another key rejects");
    }

    #[test]
    fn bad_keys() {
        let cases = [("%%%", "not base64"), ("AAAA", "3 bytes")];
        for (text, want) in cases {
            let err = parse_signing_key(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            let err = parse_public_key(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
