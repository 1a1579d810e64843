//! Fetching a node artifact from the store by digest (`GET /v2/<repo>/blobs/sha256:…`):
//! what the agent installs is never used before its sha256 matches the desired config.
//!
//! - **Resumable**: bytes go to `<dest>.<digest>.part`; a later attempt for the same digest
//!   hashes what is there and asks for the rest with an HTTP `Range` request, and accepts
//!   only a `206` with exactly that `Content-Range` (a server that ignores the range starts
//!   over). Partial files of other digests are removed; what was kept and turns out wrong
//!   is dropped and fetched once more from zero.
//! - **One at a time**: `<dest>.lock` is held (flock) for the whole fetch.
//! - **Checked**: size and sha256 must match; otherwise the partial file is removed and the
//!   error says what came instead — nothing is installed.
//! - **Atomic**: the complete file is fsynced, made executable and renamed onto `dest`, then
//!   the directory is fsynced: a power cut leaves either the old file or the new one.
//! - **Idempotent**: a `dest` that already has the digest is not downloaded again.
//! - **Room first**: the free space of `dest`'s file system is checked before the request.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::verified::{Stamp, Verified};
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
        // The store serves blobs itself (filesystem storage); a redirect elsewhere is not
        // followed.
        .redirect(reqwest::redirect::Policy::none())
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

/// Fetches `want` into `dest` (mode 0755). One fetch per `dest` at a time: a second
/// concurrent one fails at once instead of writing into the same partial file.
pub async fn fetch(client: &reqwest::Client, want: &Want<'_>, dest: &Path) -> Result<Outcome> {
    check_want(want)?;
    let _lock = lock(dest)?;
    if dest.is_file() && hash_file(dest)?.0 == want.sha256 {
        return Ok(Outcome::AlreadyPresent);
    }
    remove_other_parts(dest, want.sha256)?;
    let part = part_path(dest, want.sha256);
    let resuming = std::fs::metadata(&part).is_ok_and(|m| m.len() > 0);
    match attempt(client, want, dest, &part).await {
        // What a previous attempt kept was wrong (a flipped bit on disk, a server that
        // changed under the same digest…): it is gone now; one fresh try before giving up.
        Err(Error::DigestMismatch { .. }) if resuming => attempt(client, want, dest, &part).await,
        other => other,
    }
}

/// [`fetch`], unless `verified` says this process already checked `dest` for this digest and
/// it has not changed since; records what it checked.
pub async fn fetch_verified(
    client: &reqwest::Client,
    want: &Want<'_>,
    dest: &Path,
    verified: &Verified,
) -> Result<Outcome> {
    if verified.current(dest, want.sha256) {
        return Ok(Outcome::AlreadyPresent);
    }
    let before = Stamp::of(dest);
    let outcome = fetch(client, want, dest).await?;
    let checked = match outcome {
        // What was hashed is what was there before, if it still is.
        Outcome::AlreadyPresent => before,
        // Written, checked and renamed into place by this fetch.
        Outcome::Downloaded { .. } => Stamp::of(dest),
    };
    verified.record(dest, want.sha256, checked);
    Ok(outcome)
}

/// One try: resume what `part` holds, receive the rest, check, install.
async fn attempt(
    client: &reqwest::Client,
    want: &Want<'_>,
    dest: &Path,
    part: &Path,
) -> Result<Outcome> {
    let (mut hasher, mut have) = match std::fs::metadata(part) {
        Ok(m) if m.len() <= want.size => hash_file(part).map(|(_, h, n)| (h, n))?,
        Ok(_) => {
            remove(part)?;
            (Sha256::new(), 0)
        }
        Err(_) => (Sha256::new(), 0),
    };
    if have == want.size {
        // A previous attempt got everything and stopped before the rename (maybe before
        // its fsync too).
        std::fs::File::open(part)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("sync", part))?;
        return finish(part, dest, hasher, want, 0, have);
    }
    check_space(dest, want.size - have)?;
    let mut request = client.get(want.url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response = request.send().await.map_err(|e| failed(want, e))?;
    let status = response.status().as_u16();
    let resumes = status == 206 && have > 0 && content_range_is(&response, have, want.size);
    let mut file = if resumes || (status == 200 && have == 0) {
        open_append(part)?
    } else if status == 200 || status == 206 {
        // The server ignored the range or answered another one: start over from this
        // response if it is the whole blob, else from nothing next time.
        remove(part)?;
        if status == 206 {
            return Err(Error::Download {
                url: want.url.to_string(),
                detail: format!("HTTP 206 for another range than bytes={have}-"),
            });
        }
        hasher = Sha256::new();
        have = 0;
        create(part)?
    } else {
        if status == 416 {
            remove(part)?;
        }
        return Err(Error::Download {
            url: want.url.to_string(),
            detail: format!("HTTP {status}"),
        });
    };
    let (start, resumed_from) = (have, have);
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(want, e))? {
        have += chunk.len() as u64;
        if have > want.size {
            drop(file);
            remove(part)?;
            return Err(Error::Download {
                url: want.url.to_string(),
                detail: format!("more than the expected {} bytes", want.size),
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(Error::io("write", part))?;
    }
    file.sync_all().map_err(Error::io("sync", part))?;
    drop(file);
    if have < want.size {
        // Kept: the next attempt resumes from here.
        return Err(Error::Download {
            url: want.url.to_string(),
            detail: format!("connection ended after {have} of {} bytes", want.size),
        });
    }
    finish(part, dest, hasher, want, have - start, resumed_from)
}

/// Whether a 206 answers exactly `bytes={from}-` of a blob of `size` bytes.
fn content_range_is(response: &reqwest::Response, from: u64, size: u64) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == content_range(from, size))
}

/// The `Content-Range` of the rest of a `size`-byte blob from `from`.
pub fn content_range(from: u64, size: u64) -> String {
    format!("bytes {from}-{}/{size}", size.saturating_sub(1))
}

/// An exclusive, non-blocking lock on `<dest>.lock`, held for the whole fetch.
fn lock(dest: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    }
    let path = sibling(dest, ".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io("open", &path))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        Error::Download {
            url: String::new(),
            detail: format!("{}: another fetch holds it ({e})", path.display()),
        }
    })
}

/// Removes partial files of `dest` left for other digests (an older version's download).
fn remove_other_parts(dest: &Path, sha256: &str) -> Result<()> {
    let keep = part_path(dest, sha256);
    let prefix = format!(
        "{}.",
        dest.file_name().unwrap_or_default().to_string_lossy()
    );
    let dir = parent(dest);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".part") && e.path() != keep {
            remove(&e.path())?;
        }
    }
    Ok(())
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

/// `<dest>.<first 16 hex digits of sha256>.part`: a partial file is resumed only for the
/// digest it was started for.
pub fn part_path(dest: &Path, sha256: &str) -> PathBuf {
    sibling(dest, &format!(".{}.part", &sha256[..sha256.len().min(16)]))
}

fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
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
    let need = need.saturating_add(SPARE_BYTES);
    if free < need {
        return Err(Error::NoSpace {
            path: dir.to_path_buf(),
            need,
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
    crate::fs::rename_synced(part, dest)
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
    fn part_file_sits_beside_dest_named_by_digest() {
        let sha = format!("{}{}", "0123456789abcdef", "f".repeat(48));
        assert_eq!(
            part_path(Path::new("/var/lib/tether/bin/kubelet"), &sha),
            Path::new("/var/lib/tether/bin/kubelet.0123456789abcdef.part")
        );
    }

    #[test]
    fn content_ranges() {
        assert_eq!(content_range(100, 1000), "bytes 100-999/1000");
        assert_eq!(content_range(0, 1), "bytes 0-0/1");
    }

    #[test]
    fn other_digests_parts_go_and_ours_stays() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("kubelet");
        let (ours, old) = ("a".repeat(64), "b".repeat(64));
        for p in [part_path(&dest, &ours), part_path(&dest, &old)] {
            std::fs::write(p, b"x").unwrap();
        }
        std::fs::write(t.path().join("kubectl.bbbbbbbbbbbbbbbb.part"), b"x").unwrap();
        remove_other_parts(&dest, &ours).unwrap();
        assert!(part_path(&dest, &ours).exists());
        assert!(!part_path(&dest, &old).exists());
        assert!(t.path().join("kubectl.bbbbbbbbbbbbbbbb.part").exists());
    }

    #[test]
    fn a_second_fetch_of_the_same_dest_is_refused_while_one_runs() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("kubelet");
        let held = lock(&dest).unwrap();
        let err = lock(&dest).unwrap_err();
        assert!(err.to_string().contains("another fetch"), "{err}");
        drop(held);
        lock(&dest).unwrap();
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

    /// A one-shot HTTP server on loopback answering every request with `head` + `body`:
    /// a server that ignores `Range`, or answers another range than asked.
    async fn serve(head: String, body: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/blob", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let _ = c.write_all(head.as_bytes()).await;
                let _ = c.write_all(&body).await;
            }
        });
        url
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[tokio::test]
    async fn a_server_that_ignores_range_is_followed_from_zero() {
        let body = b"0123456789abcdef".repeat(1000);
        let url = serve(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()),
            body.clone(),
        )
        .await;
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("bin");
        let digest = sha(&body);
        std::fs::write(part_path(&dest, &digest), &body[..5000]).unwrap();
        let want = Want {
            url: &url,
            sha256: &digest,
            size: body.len() as u64,
        };
        let got = fetch(&client().unwrap(), &want, &dest).await.unwrap();
        assert_eq!(
            got,
            Outcome::Downloaded {
                fetched: body.len() as u64,
                resumed_from: 0
            }
        );
        assert_eq!(std::fs::read(&dest).unwrap(), body);
    }

    #[tokio::test]
    async fn a_206_for_another_range_is_refused_and_the_part_dropped() {
        let body = b"x".repeat(1000);
        let url = serve(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/1000\r\n\
             Content-Length: 1000\r\n\r\n"
                .into(),
            body.clone(),
        )
        .await;
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("bin");
        let digest = sha(&body);
        std::fs::write(part_path(&dest, &digest), &body[..100]).unwrap();
        let want = Want {
            url: &url,
            sha256: &digest,
            size: 1000,
        };
        let err = fetch(&client().unwrap(), &want, &dest).await.unwrap_err();
        assert!(err.to_string().contains("another range"), "{err}");
        assert!(!dest.exists() && !part_path(&dest, &digest).exists());
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let url = serve(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/x\r\n\
             Content-Length: 0\r\n\r\n"
                .into(),
            vec![],
        )
        .await;
        let t = tempfile::tempdir().unwrap();
        let digest = "0".repeat(64);
        let want = Want {
            url: &url,
            sha256: &digest,
            size: 1,
        };
        let err = fetch(&client().unwrap(), &want, &t.path().join("bin"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("HTTP 307"), "{err}");
    }

    #[tokio::test]
    async fn a_verified_file_is_not_hashed_again_until_it_changes() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("kubelet");
        let body = b"kubelet".repeat(100);
        std::fs::write(&dest, &body).unwrap();
        let digest = sha(&body);
        // Nothing listens there: any fetch that goes past the checks fails.
        let want = |sha256| Want {
            url: "http://127.0.0.1:9/blob",
            sha256,
            size: body.len() as u64,
        };
        let (c, verified) = (client().unwrap(), Verified::default());
        let first = fetch_verified(&c, &want(&digest), &dest, &verified).await;
        assert_eq!(
            first.unwrap(),
            Outcome::AlreadyPresent,
            "hashed and matched"
        );
        assert!(verified.current(&dest, &digest), "and recorded");

        // The memo answers without hashing: vouched for under another digest, the file is
        // taken as is (hashing would find the mismatch and try the dead URL).
        let other = "b".repeat(64);
        verified.record(&dest, &other, Stamp::of(&dest));
        let memo = fetch_verified(&c, &want(&other), &dest, &verified).await;
        assert_eq!(memo.unwrap(), Outcome::AlreadyPresent);

        // Flipped in place, size and mtime put back: hashed again, the mismatch found, a
        // download attempted (and refused), nothing recorded.
        verified.record(&dest, &digest, Stamp::of(&dest));
        let mtime = std::fs::metadata(&dest).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut tampered = body.clone();
        tampered[0] ^= 1;
        std::fs::write(&dest, &tampered).unwrap();
        let f = std::fs::File::options().write(true).open(&dest).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let err = fetch_verified(&c, &want(&digest), &dest, &verified).await;
        assert!(matches!(err, Err(Error::Download { .. })), "{err:?}");
        assert!(!verified.current(&dest, &digest));
    }

    #[test]
    fn space_is_checked() {
        let t = tempfile::tempdir().unwrap();
        for huge in [u64::MAX / 2, u64::MAX] {
            let err = check_space(&t.path().join("f"), huge).unwrap_err();
            assert!(matches!(err, Error::NoSpace { .. }), "{err}");
        }
        check_space(&t.path().join("f"), 1).unwrap();
    }
}
