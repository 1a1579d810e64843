//! What this process has already checked by digest, so a pass over an installed node does
//! not hash the runtime again.
//!
//! The node loop (`service.rs`) runs passes often while it waits on the tenant and
//! periodically once joined; hashing the nine node binaries (186 MB) takes 4–6 s of a TCG
//! vCPU, which held back the pass that notices the kubelet's certificate and took the CPU
//! the node's first image pulls needed. A file is trusted again only while its device,
//! inode, size, modification time and change time are what they were when it matched. The
//! change time cannot be set from user space and moves on every write, rename, chmod or
//! link, so any rewrite — even one that puts size and mtime back — makes the next pass hash
//! the file again. A restart of the agent hashes everything once.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a file looked like: enough that any change to it changes this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of `path` now; `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Files verified by this process: path → (digest, stamp when it matched).
#[derive(Debug, Default)]
pub struct Verified(Mutex<HashMap<PathBuf, (String, Stamp)>>);

impl Verified {
    /// Whether `path` is unchanged since it was recorded with this `sha256`.
    pub fn current(&self, path: &Path, sha256: &str) -> bool {
        let known = self.lock().get(path).cloned();
        match (known, Stamp::of(path)) {
            (Some((digest, then)), Some(now)) => digest == sha256 && then == now,
            _ => false,
        }
    }

    /// Records that `path` held `sha256` while it looked like `checked` (a stamp taken
    /// before the check); records nothing, and forgets `path`, when it changed since.
    pub fn record(&self, path: &Path, sha256: &str, checked: Option<Stamp>) {
        match (checked, Stamp::of(path)) {
            (Some(then), Some(now)) if then == now => {
                self.lock()
                    .insert(path.to_path_buf(), (sha256.to_string(), now));
            }
            _ => {
                self.lock().remove(path);
            }
        }
    }

    /// Forgets everything (the node was wiped).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (String, Stamp)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::time::{Duration, SystemTime};

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn set_mtime(p: &Path, t: SystemTime) {
        File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    fn mtime(p: &Path) -> SystemTime {
        std::fs::metadata(p).unwrap().modified().unwrap()
    }

    /// Records `p` as checked just now.
    fn record(v: &Verified, p: &Path) {
        v.record(p, SHA, Stamp::of(p));
        assert!(v.current(p, SHA));
    }

    #[test]
    fn unknown_files_are_not_current() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubelet");
        std::fs::write(&p, b"bin").unwrap();
        assert!(!Verified::default().current(&p, SHA));
    }

    #[test]
    fn a_recorded_file_is_current_for_its_digest_only() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubelet");
        std::fs::write(&p, b"bin").unwrap();
        let v = Verified::default();
        record(&v, &p);
        assert!(!v.current(&p, &"b".repeat(64)));
    }

    #[test]
    fn any_rewrite_is_noticed_even_with_size_and_mtime_put_back() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubelet");
        std::fs::write(&p, b"bin").unwrap();
        let v = Verified::default();
        let before = mtime(&p);

        // Rewritten in place, same size, mtime put back: only the change time tells.
        record(&v, &p);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"BIN").unwrap();
        set_mtime(&p, before);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 3);
        assert!(!v.current(&p, SHA));

        // Appended to, mtime put back: the size.
        record(&v, &p);
        File::options()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        set_mtime(&p, before);
        assert!(!v.current(&p, SHA));

        // Replaced by a rename (what an install does): another inode.
        record(&v, &p);
        let other = t.path().join("new");
        std::fs::write(&other, b"BINx").unwrap();
        set_mtime(&other, before);
        std::fs::rename(&other, &p).unwrap();
        assert!(!v.current(&p, SHA));

        // Touched.
        record(&v, &p);
        set_mtime(&p, before + Duration::from_secs(5));
        assert!(!v.current(&p, SHA));

        // Gone.
        record(&v, &p);
        std::fs::remove_file(&p).unwrap();
        assert!(!v.current(&p, SHA));
    }

    #[test]
    fn a_file_that_changed_during_its_check_is_not_recorded() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubelet");
        std::fs::write(&p, b"bin").unwrap();
        let v = Verified::default();
        record(&v, &p);
        let checked = Stamp::of(&p);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"BIN").unwrap();
        v.record(&p, SHA, checked);
        assert!(v.lock().get(&p).is_none(), "the old entry is dropped too");
        assert!(!v.current(&p, SHA));
    }

    #[test]
    fn a_missing_file_is_forgotten_and_clear_forgets_all() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let v = Verified::default();
        record(&v, &a);
        record(&v, &b);
        std::fs::remove_file(&a).unwrap();
        v.record(&a, SHA, None);
        assert!(v.lock().get(&a).is_none());
        v.clear();
        assert!(v.lock().is_empty());
        assert!(!v.current(&b, SHA));
    }
}
