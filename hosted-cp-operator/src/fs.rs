//! Files the operator keeps on local disk (certificates, kubeconfigs, pidfiles, ports):
//! written whole or not at all, owner-only, because a crash or a second writer must never
//! leave a torn key or certificate that looks complete.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Writes `path` with mode 0600 through a temporary file, `fsync` and a rename, so a crash
/// never leaves a half-written certificate behind. The temporary name is unique per file,
/// process and call: concurrent reconciles writing the same directory (a DataStore's admin
/// credentials, `root.crt` next to `root.key`) never share one.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, contents)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("write", &tmp)(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("rename", path)(e)
    })
}

/// `.<file name>.<pid>.<n>.tmp` next to `path`.
fn tmp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// The contents of `path`, made by `make` and written atomically the first time: files that
/// are created once and then kept across restarts (a service-account key).
pub fn ensure_file(
    path: &Path,
    make: impl FnOnce() -> Result<Vec<u8>, Error>,
) -> Result<Vec<u8>, Error> {
    if let Ok(b) = fs::read(path) {
        return Ok(b);
    }
    let b = make()?;
    write_atomic(path, &b)?;
    Ok(b)
}

/// The contents of `dir/file`, with the path in the error.
pub fn read(dir: &Path, file: &str) -> Result<Vec<u8>, Error> {
    let p = dir.join(file);
    fs::read(&p).map_err(Error::io("read", &p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_of_same_stem_files_never_mixes_contents() {
        // `root.crt` and `root.key` once shared the temporary `root.tmp`: two writers could
        // rename each other's bytes into place.
        assert_ne!(
            tmp_path(Path::new("/d/root.crt")),
            tmp_path(Path::new("/d/root.key"))
        );
        assert_ne!(tmp_path(Path::new("/d/a")), tmp_path(Path::new("/d/a")));
        let dir = tempfile::tempdir().unwrap();
        let writer = |name: &'static str, body: &'static [u8]| {
            let d = dir.path().to_path_buf();
            std::thread::spawn(move || {
                for _ in 0..300 {
                    write_atomic(&d.join(name), body).unwrap();
                }
            })
        };
        let a = writer("root.crt", b"CERT");
        let b = writer("root.key", b"KEY");
        let c = writer("root.key", b"KEY");
        for t in [a, b, c] {
            t.join().unwrap();
        }
        assert_eq!(fs::read(dir.path().join("root.crt")).unwrap(), b"CERT");
        assert_eq!(fs::read(dir.path().join("root.key")).unwrap(), b"KEY");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 2, "temporary files left: {left:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn ensure_file_makes_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        assert_eq!(ensure_file(&p, || Ok(b"one".to_vec())).unwrap(), b"one");
        assert_eq!(ensure_file(&p, || Ok(b"two".to_vec())).unwrap(), b"one");
    }
}
