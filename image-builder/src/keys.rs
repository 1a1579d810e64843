//! Signing keys on disk: `tether-image keygen` writes `signing.key` (0600) and `signing.pub`,
//! one line of base64 each; builds read the secret half, `verify` the public half. The key
//! format, the manifest and the signature itself are the shared
//! [`tether_boot::manifest`]'s.

use std::fs;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use tether_boot::manifest;

use crate::{Error, Result};

/// A new key pair from the OS's random source.
pub fn generate() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Key {
        path: "<random>".into(),
        reason: format!("no randomness: {e}"),
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `signing.key` (mode 0600) and `signing.pub` into `dir`; refuses to overwrite.
pub fn keygen(dir: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let key = generate()?;
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
    writeln!(f, "{}", manifest::signing_key_text(&key)).map_err(Error::io("write", &key_path))?;
    fs::write(&pub_path, format!("{}\n", manifest::public_key_text(&key)))
        .map_err(Error::io("write", &pub_path))?;
    Ok(())
}

/// Reads a signing key file.
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let text = fs::read_to_string(path).map_err(Error::io("read key", path))?;
    manifest::parse_signing_key(&text).map_err(|e| key_error(path, e))
}

/// Reads a public key file.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let text = fs::read_to_string(path).map_err(Error::io("read key", path))?;
    manifest::parse_public_key(&text).map_err(|e| key_error(path, e))
}

fn key_error(path: &Path, e: tether_boot::Error) -> Error {
    Error::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_pair_and_refuses_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        keygen(dir.path()).unwrap();
        let key = read_signing_key(&dir.path().join("signing.key")).unwrap();
        assert_eq!(
            read_public_key(&dir.path().join("signing.pub")).unwrap(),
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

    #[test]
    fn bad_key_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, "AAAA\n").unwrap();
        let err = read_signing_key(&p).unwrap_err().to_string();
        assert!(err.contains("k:") && err.contains("3 bytes"), "{err}");
    }
}
