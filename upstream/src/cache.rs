//! The binary cache: `<root>/bin/<component>/<version>/<component>` plus a recorded sha256.
//!
//! A version directory only ever appears by an atomic rename of a fully written staging
//! directory, so a build that is killed half way leaves a `.partial` directory that is never
//! mistaken for a complete binary (and is cleaned up by the next build).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::pins::{Component, Module};
use crate::{Error, Result};

/// Where pinned upstream binaries and their build inputs are kept, outside the repository.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// The cache named by `TETHER_CACHE_DIR`, else `$XDG_CACHE_HOME/tether`, else
    /// `~/.cache/tether`.
    pub fn from_env() -> Cache {
        let root = std::env::var_os("TETHER_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("tether")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tether")))
            .unwrap_or_else(|| PathBuf::from("/var/cache/tether"));
        Cache { root }
    }

    /// A cache rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding one component version.
    pub fn bin_dir(&self, component: Component, version: &str) -> PathBuf {
        self.root.join("bin").join(component.name()).join(version)
    }

    /// The path the binary has once it is in the cache.
    pub fn binary_path(&self, component: Component, version: &str) -> PathBuf {
        self.bin_dir(component, version).join(component.name())
    }

    /// The wrapper Go module that builds `module` at `version`.
    pub fn go_work_dir(&self, module: Module, version: &str) -> PathBuf {
        self.root.join("go").join(module.slug()).join(version)
    }

    /// The cached binary of `component` at its default pinned version (the one that goes
    /// with the pinned Kubernetes), without building it: what every program that runs an
    /// upstream binary asks for.
    pub fn pinned(&self, component: Component) -> Result<PathBuf> {
        let pins = crate::Pins::default();
        self.lookup(component, &pins.version_for(component, pins.kubernetes)?)
    }

    /// The cached binary, without building it. Cheap: it checks presence, not the hash.
    pub fn lookup(&self, component: Component, version: &str) -> Result<PathBuf> {
        let path = self.binary_path(component, version);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::Missing {
                component: component.name().to_string(),
                version: version.to_string(),
                path,
            })
        }
    }

    /// Whether the cached binary still has the sha256 recorded when it was built.
    pub fn verify(&self, component: Component, version: &str) -> Result<bool> {
        let path = self.binary_path(component, version);
        let record = path.with_file_name(format!("{}.sha256", component.name()));
        let Ok(recorded) = fs::read_to_string(&record) else {
            return Ok(false);
        };
        let Some(want) = recorded.split_whitespace().next() else {
            return Ok(false);
        };
        match sha256_file(&path) {
            Ok(got) => Ok(got == want),
            Err(_) => Ok(false),
        }
    }

    /// A fresh staging directory for building `component` at `version`; stale ones from
    /// killed builds are removed first.
    pub fn staging_dir(&self, component: Component, version: &str) -> Result<PathBuf> {
        let parent = self.root.join("bin").join(component.name());
        fs::create_dir_all(&parent).map_err(Error::io("create", &parent))?;
        let prefix = format!(".{version}.partial-");
        if let Ok(entries) = fs::read_dir(&parent) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let staging = parent.join(format!("{prefix}{}", std::process::id()));
        fs::create_dir_all(&staging).map_err(Error::io("create", &staging))?;
        Ok(staging)
    }

    /// Records the sha256 of the binary built in `staging` and atomically publishes the
    /// directory as the cached version. Returns the binary's final path.
    pub fn publish(&self, component: Component, version: &str, staging: &Path) -> Result<PathBuf> {
        let built = staging.join(component.name());
        let digest = sha256_file(&built).map_err(Error::io("hash", &built))?;
        let record = staging.join(format!("{}.sha256", component.name()));
        let mut f = File::create(&record).map_err(Error::io("create", &record))?;
        writeln!(f, "{digest}  {}", component.name()).map_err(Error::io("write", &record))?;
        f.sync_all().map_err(Error::io("sync", &record))?;
        File::open(&built)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("sync", &built))?;
        let dest = self.bin_dir(component, version);
        if dest.exists() {
            // Only reached when verification failed: the old directory is known bad.
            fs::remove_dir_all(&dest).map_err(Error::io("remove", &dest))?;
        }
        fs::rename(staging, &dest).map_err(Error::io("rename", &dest))?;
        if let Some(parent) = dest.parent() {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(dest.join(component.name()))
    }

    /// An exclusive lock (held until the returned file is dropped) so that two processes
    /// never build into the same wrapper module at once.
    pub fn lock(&self, name: &str) -> Result<File> {
        let dir = self.root.join("locks");
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        let path = dir.join(format!("{name}.lock"));
        let file = File::create(&path).map_err(Error::io("create", &path))?;
        file.lock().map_err(Error::io("lock", &path))?;
        Ok(file)
    }
}

/// Hex sha256 of a file's contents.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_is_atomic_and_verifiable() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path());
        let c = Component::Etcd;
        assert!(matches!(
            cache.lookup(c, "v1.0.0"),
            Err(Error::Missing { .. })
        ));

        // A killed build leaves only a partial directory: still missing.
        let staging = cache.staging_dir(c, "v1.0.0").unwrap();
        fs::write(staging.join("etcd"), b"half").unwrap();
        assert!(cache.lookup(c, "v1.0.0").is_err());

        // The next build removes the stale partial directory and publishes.
        let staging = cache.staging_dir(c, "v1.0.0").unwrap();
        let parent = staging.parent().unwrap().to_path_buf();
        assert_eq!(fs::read_dir(&parent).unwrap().count(), 1);
        fs::write(staging.join("etcd"), b"binary").unwrap();
        let path = cache.publish(c, "v1.0.0", &staging).unwrap();
        assert_eq!(cache.lookup(c, "v1.0.0").unwrap(), path);
        assert!(cache.verify(c, "v1.0.0").unwrap());

        // Corruption is detected.
        fs::write(&path, b"tampered").unwrap();
        assert!(!cache.verify(c, "v1.0.0").unwrap());

        // Republishing over a bad version replaces it.
        let staging = cache.staging_dir(c, "v1.0.0").unwrap();
        fs::write(staging.join("etcd"), b"binary2").unwrap();
        cache.publish(c, "v1.0.0", &staging).unwrap();
        assert!(cache.verify(c, "v1.0.0").unwrap());
        assert_eq!(
            fs::read(cache.binary_path(c, "v1.0.0")).unwrap(),
            b"binary2"
        );
    }

    #[test]
    fn missing_record_is_not_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path());
        let dir = cache.bin_dir(Component::Kine, "v1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("kine"), b"x").unwrap();
        assert!(cache.lookup(Component::Kine, "v1").is_ok());
        assert!(!cache.verify(Component::Kine, "v1").unwrap());
    }
}
