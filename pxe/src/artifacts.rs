//! Content-addressed artifacts: files known by their sha256, served at
//! `/artifacts/sha256/<hex>`. The store is built at start-up by hashing every file we are
//! told about, so a request can only ever reach a file we registered (the URL names a hash,
//! never a path).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One registered file.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Where it is on disk.
    pub path: PathBuf,
    /// Its size when hashed.
    pub size: u64,
    /// The file, opened once at registration; bodies are sent from it with sendfile(2),
    /// page cache to socket, with no copy through user space.
    pub file: Arc<std::fs::File>,
}

/// sha256 → file.
#[derive(Debug, Clone, Default)]
pub struct Store {
    by_hash: HashMap<String, Stored>,
}

/// Hashes a file, returning (lower-case hex sha256, size).
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(Error::io("read", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

impl Store {
    /// Hashes and registers a file; returns its sha256.
    pub fn add_file(&mut self, path: &Path) -> Result<String> {
        let (hash, size) = hash_file(path)?;
        let file = std::fs::File::open(path).map_err(Error::io("open", path.display()))?;
        let now = file
            .metadata()
            .map_err(Error::io("stat", path.display()))?
            .len();
        if now != size {
            return Err(Error::Config {
                path: path.to_path_buf(),
                detail: "file changed while it was being registered".into(),
            });
        }
        self.by_hash.insert(
            hash.clone(),
            Stored {
                path: path.to_path_buf(),
                size,
                file: Arc::new(file),
            },
        );
        Ok(hash)
    }

    /// Registers every regular file directly in `dir`.
    pub fn add_dir(&mut self, dir: &Path) -> Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(dir).map_err(Error::io("read dir", dir.display()))? {
            let entry = entry.map_err(Error::io("read dir", dir.display()))?;
            let ft = entry
                .file_type()
                .map_err(Error::io("stat", entry.path().display()))?;
            if ft.is_file() {
                self.add_file(&entry.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The file with this hash, if registered.
    pub fn get(&self, sha256: &str) -> Option<&Stored> {
        self.by_hash.get(sha256)
    }

    /// Number of registered files.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}
