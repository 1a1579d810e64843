//! Fetching a node artifact from the store by digest (`GET /v2/<repo>/blobs/sha256:…`):
//! what the agent installs is never used before its sha256 matches the desired config.
//!
//! - **Resumable**: bytes go to `<dest>.part`; a later attempt hashes what is there and asks
//!   for the rest with an HTTP `Range` request (a server that ignores it starts over).
//! - **Checked**: size and sha256 must match; otherwise the partial file is removed and the
//!   error says what came instead — nothing is installed.
//! - **Atomic**: the complete file is fsynced, made executable and renamed onto `dest`, then
//!   the directory is fsynced: a power cut leaves either the old file or the new one.
//! - **Idempotent**: a `dest` that already has the digest is not downloaded again.
//! - **Room first**: the free space of `dest`'s file system is checked before the request.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want<'a> {
    /// The blob's URL.
    pub url: &'a str,
    /// Its sha256, lower-case hex.
    pub sha256: &'a str,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`fetch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `dest` already had the digest.
    AlreadyPresent,
    /// Downloaded: `fetched` bytes over the network, after `resumed_from` bytes that a
    /// previous attempt had left.
    Downloaded {
        /// Bytes received now.
        fetched: u64,
        /// Bytes reused from `<dest>.part`.
        resumed_from: u64,
    },
}

/// A client for the store: plain HTTP (what arrives is checked by digest), bounded connect
/// and read stalls, no limit on a whole transfer of a large binary.
pub fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(crate::tls::trusts_nothing()?)
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| Error::Download {
            url: String::new(),
            detail: format!("build the HTTP client: {e}"),
        })
}

/// Head room kept free beyond the file itself.
const SPARE_BYTES: u64 = 16 << 20;

/// Fetches `want` into `dest` (mode 0755).
pub async fn fetch(client: &reqwest::Client, want: &Want<'_>, dest: &Path) -> Result<Outcome> {
    check_want(want)?;
    if dest.is_file() && hash_file(dest)?.0 == want.sha256 {
        return Ok(Outcome::AlreadyPresent);
    }
    let part = part_path(dest);
    let (mut hasher, mut have) = match std::fs::metadata(&part) {
        Ok(m) if m.len() <= want.size => hash_file(&part).map(|(_, h, n)| (h, n))?,
        Ok(_) => {
            remove(&part)?;
            (Sha256::new(), 0)
        }
        Err(_) => (Sha256::new(), 0),
    };
    let resumed_from = have;
    if have == want.size {
        // A previous attempt got everything and stopped before the rename.
        return finish(&part, dest, hasher, want, 0, resumed_from);
    }
    check_space(dest, want.size - have)?;
    let mut request = client.get(want.url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let response = request.send().await.map_err(|e| failed(want, e))?;
    let mut file = match (have, response.status().as_u16()) {
        (0, 200) | (_, 206) => open_append(&part)?,
        // The server sent the whole blob (no Range support) or cannot serve the range:
        // start over.
        (_, 200) => {
            hasher = Sha256::new();
            have = 0;
            create(&part)?
        }
        (_, status) => {
            if status == 416 {
                remove(&part)?;
            }
            return Err(Error::Download {
                url: want.url.to_string(),
                detail: format!("HTTP {status}"),
            });
        }
    };
    let start = have;
    let mut response = response;
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(want, e))? {
        have += chunk.len() as u64;
        if have > want.size {
            drop(file);
            remove(&part)?;
            return Err(Error::Download {
                url: want.url.to_string(),
                detail: format!("more than the expected {} bytes", want.size),
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(Error::io("write", &part))?;
    }
    file.sync_all().map_err(Error::io("sync", &part))?;
    drop(file);
    if have < want.size {
        // Kept: the next attempt resumes from here.
        return Err(Error::Download {
            url: want.url.to_string(),
            detail: format!("connection ended after {have} of {} bytes", want.size),
        });
    }
    finish(&part, dest, hasher, want, have - start, resumed_from)
}

/// Checks the complete `part` (hashed into `hasher`) and installs it as `dest`.
fn finish(
    part: &Path,
    dest: &Path,
    hasher: Sha256,
    want: &Want<'_>,
    fetched: u64,
    resumed_from: u64,
) -> Result<Outcome> {
    let got = hex::encode(hasher.finalize());
    if got != want.sha256 {
        remove(part)?;
        return Err(Error::DigestMismatch {
            url: want.url.to_string(),
            expected: want.sha256.to_string(),
            actual: got,
        });
    }
    install(part, dest)?;
    Ok(Outcome::Downloaded {
        fetched,
        resumed_from,
    })
}

/// `<dest>.part`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn check_want(want: &Want<'_>) -> Result<()> {
    let hex_ok = want.sha256.len() == 64
        && want
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex_ok {
        return Err(Error::BadInput {
            source_name: format!("artifact {}", want.url),
            detail: format!("sha256 {:?} is not 64 lower-case hex digits", want.sha256),
        });
    }
    Ok(())
}

fn failed(want: &Want<'_>, e: reqwest::Error) -> Error {
    Error::Download {
        url: want.url.to_string(),
        detail: e.to_string(),
    }
}

/// (hex digest, the hasher fed with the file, bytes read).
fn hash_file(path: &Path) -> Result<(String, Sha256, u64)> {
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(Error::io("read", path))?;
    Ok((hex::encode(h.clone().finalize()), h, n))
}

fn check_space(dest: &Path, need: u64) -> Result<()> {
    let dir = parent(dest);
    let s = nix::sys::statvfs::statvfs(dir).map_err(|e| Error::Io {
        action: "statvfs",
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let free = s.blocks_available() as u64 * s.fragment_size() as u64;
    if free < need + SPARE_BYTES {
        return Err(Error::NoSpace {
            path: dir.to_path_buf(),
            need: need + SPARE_BYTES,
            free,
        });
    }
    Ok(())
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn open_append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(Error::io("open", path))
}

fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(Error::io("create", path))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            action: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn install(part: &Path, dest: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(part, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io("chmod", part))?;
    std::fs::rename(part, dest).map_err(Error::io("rename", dest))?;
    let dir = parent(dest);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_builds_without_a_process_wide_crypto_provider() {
        // (The agent installs no default provider; reqwest panics without one unless it is
        // given a config.)
        client().unwrap();
    }

    #[test]
    fn part_file_sits_beside_dest() {
        assert_eq!(
            part_path(Path::new("/var/lib/tether/bin/kubelet")),
            Path::new("/var/lib/tether/bin/kubelet.part")
        );
    }

    #[test]
    fn digests_must_be_hex() {
        for bad in ["", "abc", &"A".repeat(64), &"g".repeat(64), &"0".repeat(63)] {
            let w = Want {
                url: "http://x/b",
                sha256: bad,
                size: 1,
            };
            assert!(check_want(&w).is_err(), "{bad:?}");
        }
        let ok = "0".repeat(64);
        assert!(
            check_want(&Want {
                url: "http://x/b",
                sha256: &ok,
                size: 1
            })
            .is_ok()
        );
    }

    #[test]
    fn space_is_checked() {
        let t = tempfile::tempdir().unwrap();
        let err = check_space(&t.path().join("f"), u64::MAX / 2).unwrap_err();
        assert!(matches!(err, Error::NoSpace { .. }), "{err}");
        check_space(&t.path().join("f"), 1).unwrap();
    }
}
