//! Minimal Debian root filesystems for container tests, built once with mmdebstrap and
//! cached by content (release + package list + recipe version).
//!
//! The package sources are the host's own Debian entries (the same release and mirrors apt
//! uses here), so the harness names no mirror and works wherever apt works.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tether_upstream::{Cache, debian};

use crate::{Error, Result};

/// Bump when the build steps change so cached trees are rebuilt.
const RECIPE: u32 = 2;

/// What goes into a cached root filesystem.
#[derive(Debug, Clone)]
pub struct RootfsSpec {
    /// Short name for the cache directory.
    pub name: &'static str,
    /// Debian packages installed on top of `minbase`.
    pub packages: &'static [&'static str],
}

/// systemd as init plus the D-Bus system bus: enough to boot under nspawn and be driven
/// over D-Bus.
pub const MINIMAL_SYSTEMD: RootfsSpec = RootfsSpec {
    name: "minimal-systemd",
    packages: &["systemd", "systemd-sysv", "dbus", "iproute2"],
};

/// Returns the cached tree for `spec`, building it first if needed (a couple of minutes,
/// once per machine). Concurrent callers wait for one build.
pub fn ensure(spec: &RootfsSpec) -> Result<PathBuf> {
    let release = debian::host_release()?;
    let key = cache_key(spec, &release);
    let cache = Cache::from_env();
    let base = cache.root().join("rootfs");
    let dest = base.join(format!("{}-{key}", spec.name));
    if dest.join("usr/lib/systemd/systemd").exists() {
        return Ok(dest);
    }
    let _lock = cache.lock(&format!("rootfs-{}", spec.name))?;
    if dest.join("usr/lib/systemd/systemd").exists() {
        return Ok(dest);
    }
    which("mmdebstrap", "install mmdebstrap (cargo xtask deps does)")?;
    fs::create_dir_all(&base).map_err(Error::io("create", &base))?;
    let staging = base.join(format!(
        ".{}-{key}.partial-{}",
        spec.name,
        std::process::id()
    ));
    clean_partials(&base, spec.name);
    let sources = base.join(format!(".sources-{}.sources", std::process::id()));
    fs::write(&sources, debian::host_sources(&release)?).map_err(Error::io("write", &sources))?;
    let out = Command::new("mmdebstrap")
        .arg("--variant=minbase")
        .arg("--mode=root")
        .arg("--quiet")
        .arg(format!("--include={}", spec.packages.join(",")))
        // dpkg's path-exclude takes fnmatch globs (no braces): one option per tree.
        .args(
            ["doc", "man", "locale", "info"]
                .map(|d| format!("--dpkgopt=path-exclude=/usr/share/{d}/*")),
        )
        // An empty machine-id lets systemd generate one per boot (nspawn passes the UUID).
        .arg("--customize-hook=truncate -s 0 \"$1/etc/machine-id\"")
        .arg(&release)
        .arg(&staging)
        .arg(&sources)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(Error::io("run", "mmdebstrap"))?;
    let _ = fs::remove_file(&sources);
    if !out.status.success() {
        let _ = fs::remove_dir_all(&staging);
        return Err(Error::Command {
            command: "mmdebstrap".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    fs::rename(&staging, &dest).map_err(Error::io("rename", &dest))?;
    Ok(dest)
}

fn clean_partials(base: &Path, name: &str) {
    let prefix = format!(".{name}-");
    if let Ok(entries) = fs::read_dir(base) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) && n.contains(".partial-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn cache_key(spec: &RootfsSpec, release: &str) -> String {
    let mut packages: Vec<&str> = spec.packages.to_vec();
    packages.sort_unstable();
    let mut h = Sha256::new();
    h.update(format!("{RECIPE}\n{release}\n{}", packages.join(",")));
    hex::encode(&h.finalize()[..8])
}

/// Fails with an install hint if `tool` is not on PATH.
pub(crate) fn which(tool: &str, hint: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingTool {
            tool: tool.into(),
            hint: hint.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_ignores_package_order() {
        let a = RootfsSpec {
            name: "x",
            packages: &["a", "b"],
        };
        let b = RootfsSpec {
            name: "x",
            packages: &["b", "a"],
        };
        assert_eq!(cache_key(&a, "bookworm"), cache_key(&b, "bookworm"));
        assert_ne!(cache_key(&a, "bookworm"), cache_key(&a, "trixie"));
    }
}
