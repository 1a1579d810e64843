//! What this process has already checked by digest, so a pass over an installed node does
//! not hash the runtime again.
//!
//! The node loop runs a pass every second while it waits on the tenant and every 10 s once
//! joined; hashing the nine node binaries (186 MB) takes 4–6 s of a TCG vCPU, which held
//! back the pass that notices the kubelet's certificate and took the CPU the node's first
//! image pulls needed. A file is trusted again only while its size, modification time and
//! inode are what they were when it matched; anything that rewrites it (a new file renamed
//! over it, an append, a `touch`) makes the next pass hash it again. A restart of the agent
//! hashes everything once.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// A verified file as it was: digest, size, modification time, inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    sha256: String,
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
}

impl Stamp {
    fn of(path: &Path, sha256: &str) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            sha256: sha256.to_string(),
            len: m.len(),
            modified: m.modified().ok(),
            ino: m.ino(),
        })
    }
}

/// Files verified by this process, by path.
#[derive(Debug, Default)]
pub struct Verified(Mutex<HashMap<PathBuf, Stamp>>);

impl Verified {
    /// Whether `path` is unchanged since it was recorded with this `sha256`.
    pub fn current(&self, path: &Path, sha256: &str) -> bool {
        let known = self.lock().get(path).cloned();
        known.is_some() && known == Stamp::of(path, sha256)
    }

    /// Records that `path` has just been checked to hold `sha256`.
    pub fn record(&self, path: &Path, sha256: &str) {
        match Stamp::of(path, sha256) {
            Some(stamp) => self.lock().insert(path.to_path_buf(), stamp),
            None => self.lock().remove(path),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Stamp>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn unknown_files_are_not_current() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubelet");
        std::fs::write(&p, b"bin").unwrap();
        assert!(!Verified::default().current(&p, SHA));
    }

    #[test]
    fn a_recorded_file_stays_current_until_it_changes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubelet");
        std::fs::write(&p, b"bin").unwrap();
        let v = Verified::default();
        v.record(&p, SHA);
        assert!(v.current(&p, SHA));
        assert!(
            !v.current(&p, &"b".repeat(64)),
            "another digest is not vouched for"
        );

        // Appended to: the size changes.
        File::options()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(!v.current(&p, SHA));

        // Replaced by a rename (what an install does): a new inode.
        v.record(&p, SHA);
        let other = t.path().join("new");
        std::fs::write(&other, b"binx").unwrap();
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::rename(&other, &p).unwrap();
        assert!(!v.current(&p, SHA));

        // Touched: the modification time changes.
        v.record(&p, SHA);
        let later = mtime + std::time::Duration::from_secs(5);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(!v.current(&p, SHA));

        // Gone.
        v.record(&p, SHA);
        std::fs::remove_file(&p).unwrap();
        assert!(!v.current(&p, SHA));
    }

    #[test]
    fn recording_a_missing_file_forgets_it() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubelet");
        std::fs::write(&p, b"bin").unwrap();
        let v = Verified::default();
        v.record(&p, SHA);
        std::fs::remove_file(&p).unwrap();
        v.record(&p, SHA);
        std::fs::write(&p, b"bin").unwrap();
        assert!(!v.current(&p, SHA));
    }
}
