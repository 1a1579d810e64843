//! Building a pinned component with the machine's Go toolchain.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::gomod::rewrite_go_mod;
use crate::pins::{Component, Module};
use crate::{Error, Result};

/// What [`Builder::ensure`] did for one component.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The component.
    pub component: Component,
    /// Its version.
    pub version: String,
    /// Path of the cached binary.
    pub path: PathBuf,
    /// Whether it had to be built (false: the cache was warm and verified).
    pub built: bool,
    /// Wall time spent, including verification.
    pub elapsed: Duration,
}

/// Builds components into a [`Cache`] with the `go` found on PATH.
#[derive(Debug, Clone)]
pub struct Builder {
    cache: Cache,
    go: PathBuf,
}

impl Builder {
    /// A builder that fills `cache` using `go` from PATH.
    pub fn new(cache: Cache) -> Builder {
        Builder {
            cache,
            go: PathBuf::from("go"),
        }
    }

    /// The cache this builder fills.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Returns the cached binary, building it first when it is missing or its recorded
    /// sha256 no longer matches. Safe to call from several processes at once.
    pub fn ensure(&self, component: Component, version: &str) -> Result<BuildReport> {
        let start = Instant::now();
        let module = component.module();
        let _lock = self.cache.lock(&format!("{}-{version}", module.slug()))?;
        if self.cache.lookup(component, version).is_ok() && self.cache.verify(component, version)? {
            return Ok(BuildReport {
                component,
                version: version.to_string(),
                path: self.cache.binary_path(component, version),
                built: false,
                elapsed: start.elapsed(),
            });
        }
        let work = self.prepare_module(module, version)?;
        let staging = self.cache.staging_dir(component, version)?;
        let out = staging.join(component.name());
        let ldflags = module.ldflags(version)?;
        let out_arg = out.to_string_lossy().into_owned();
        let package = component.package();
        self.go_build(
            &work,
            module.cgo(),
            &[
                "build",
                "-trimpath",
                "-tags",
                module.tags(),
                "-ldflags",
                &ldflags,
                "-o",
                &out_arg,
                &package,
            ],
        )?;
        let path = self.cache.publish(component, version, &staging)?;
        Ok(BuildReport {
            component,
            version: version.to_string(),
            path,
            built: true,
            elapsed: start.elapsed(),
        })
    }

    /// Writes the wrapper module for `module@version` (once) and returns its directory.
    fn prepare_module(&self, module: Module, version: &str) -> Result<PathBuf> {
        let dir = self.cache.go_work_dir(module, version);
        let go_mod = dir.join("go.mod");
        if go_mod.is_file() {
            return Ok(dir);
        }
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        let target = format!("{}@{version}", module.path());
        let json = self.go(&dir, &["mod", "download", "-json", &target])?;
        let info: serde_json::Value = serde_json::from_str(&json).map_err(|e| Error::Go {
            args: format!("mod download -json {target}"),
            dir: dir.clone(),
            detail: format!("unreadable output: {e}"),
        })?;
        if let Some(err) = info.get("Error").and_then(|e| e.as_str()) {
            return Err(Error::Go {
                args: format!("mod download {target}"),
                dir,
                detail: err.to_string(),
            });
        }
        let upstream_mod = info
            .get("GoMod")
            .and_then(|p| p.as_str())
            .ok_or_else(|| Error::Go {
                args: format!("mod download -json {target}"),
                dir: dir.clone(),
                detail: "no GoMod in output".into(),
            })?;
        let upstream = fs::read_to_string(upstream_mod).map_err(Error::io("read", upstream_mod))?;
        self.check_go_version(module, version, &upstream)?;
        let rewritten = rewrite_go_mod(&upstream, module, version);
        let tmp = dir.join("go.mod.tmp");
        fs::write(&tmp, rewritten).map_err(Error::io("write", &tmp))?;
        fs::rename(&tmp, &go_mod).map_err(Error::io("rename", &go_mod))?;
        Ok(dir)
    }

    fn check_go_version(&self, module: Module, version: &str, go_mod: &str) -> Result<()> {
        let Some(needed) = go_mod
            .lines()
            .find_map(|l| l.trim().strip_prefix("go ").map(str::trim))
        else {
            return Ok(());
        };
        let installed = self.go(Path::new("."), &["env", "GOVERSION"])?;
        let installed = installed.trim().trim_start_matches("go").to_string();
        if version_tuple(&installed) < version_tuple(needed) {
            return Err(Error::GoTooOld {
                module: module.path().to_string(),
                version: version.to_string(),
                needed: needed.to_string(),
                installed,
            });
        }
        Ok(())
    }

    /// Runs `go` in `dir` with the environment every build uses; returns stdout.
    fn go(&self, dir: &Path, args: &[&str]) -> Result<String> {
        self.go_build(dir, false, args)
    }

    /// [`Builder::go`] with cgo on or off (on only for modules that need C).
    fn go_build(&self, dir: &Path, cgo: bool, args: &[&str]) -> Result<String> {
        let output = Command::new(&self.go)
            .args(args)
            .current_dir(dir)
            // -mod=mod: let go record checksums for the wrapper module (verified against the
            // checksum database as usual). GOTOOLCHAIN=local: never download a toolchain.
            .env("GOFLAGS", "-mod=mod -buildvcs=false")
            .env("GOTOOLCHAIN", "local")
            .env("GOWORK", "off")
            .env("CGO_ENABLED", if cgo { "1" } else { "0" })
            .output()
            .map_err(|e| Error::Go {
                args: args.join(" "),
                dir: dir.to_path_buf(),
                detail: format!("cannot run go: {e}"),
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
            return Err(Error::Go {
                args: args.join(" "),
                dir: dir.to_path_buf(),
                detail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// `1.26.8` → `[1, 26, 8]`, tolerant of suffixes like `rc1`.
fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.')
        .map(|p| {
            p.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::version_tuple;

    #[test]
    fn go_versions_compare_numerically() {
        assert!(version_tuple("1.26.8") >= version_tuple("1.26.0"));
        assert!(version_tuple("1.26.8") < version_tuple("1.26.10"));
        assert!(version_tuple("1.26") < version_tuple("1.26.1"));
        assert!(version_tuple("1.27rc1") > version_tuple("1.26.9"));
    }
}
