//! `cargo xtask deps` and `cargo xtask env`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::Command;

use tether_upstream::{BuildReport, Builder, Cache, Pins, debian};

use crate::error::Error;
use crate::steps::{fmt_duration, timed, with_heartbeat};

/// Installs missing Debian packages (when `apt`), builds missing or corrupt upstream
/// binaries, and refreshes the PATH directory of symlinks. Idempotent; a warm run only
/// checks presence and hashes.
pub fn run(apt: bool) -> Result<Vec<BuildReport>, Error> {
    if apt {
        timed("debian packages", || {
            let report = debian::ensure_packages(debian::PACKAGES)?;
            if report.installed.is_empty() {
                println!("    all {} packages present", debian::PACKAGES.len());
            } else {
                println!("    installed: {}", report.installed.join(" "));
            }
            if !report.from_backports.is_empty() {
                println!("    from backports: {}", report.from_backports.join(" "));
            }
            Ok(())
        })?;
    }
    timed("go toolchain", || {
        let out = Command::new("go")
            .arg("version")
            .output()
            .map_err(|e| Error::Step {
                step: "go toolchain".into(),
                detail: format!("`go` not found on PATH ({e}); install Go 1.26 or newer"),
            })?;
        print!("    {}", String::from_utf8_lossy(&out.stdout));
        Ok(())
    })?;
    let builder = Builder::new(Cache::from_env());
    let mut reports = Vec::new();
    for (component, version) in Pins::default().defaults()? {
        let name = format!("{} {version}", component.name());
        let report = timed(&name, || {
            let label = format!("building {name} with go (cached after this)");
            Ok(with_heartbeat(&label, || {
                builder.ensure(component, &version)
            })?)
        })?;
        println!(
            "    {} ({})",
            report.path.display(),
            if report.built {
                "built"
            } else {
                "cached, sha256 verified"
            }
        );
        reports.push(report);
    }
    link_farm(builder.cache(), &reports)?;
    let built: Vec<String> = reports
        .iter()
        .filter(|r| r.built)
        .map(|r| format!("{} {}", r.component.name(), fmt_duration(r.elapsed)))
        .collect();
    if !built.is_empty() {
        println!("    built: {}", built.join(", "));
    }
    Ok(reports)
}

/// The directory of symlinks to the default binaries, put on PATH by `env` and `test`.
pub fn farm_dir() -> PathBuf {
    Cache::from_env().root().join("path")
}

/// Replaces `<cache>/path/<component>` with a symlink to each report's binary (atomically,
/// by renaming a fresh symlink over the old one).
fn link_farm(cache: &Cache, reports: &[BuildReport]) -> Result<(), Error> {
    let dir = cache.root().join("path");
    let io = |what: &str, e: std::io::Error| Error::Step {
        step: "link farm".into(),
        detail: format!("{what}: {e}"),
    };
    fs::create_dir_all(&dir).map_err(|e| io("create", e))?;
    for r in reports {
        let link = dir.join(r.component.name());
        let tmp = dir.join(format!(".{}.tmp", r.component.name()));
        let _ = fs::remove_file(&tmp);
        symlink(&r.path, &tmp).map_err(|e| io("symlink", e))?;
        fs::rename(&tmp, &link).map_err(|e| io("rename", e))?;
    }
    Ok(())
}

/// PATH with the farm first.
pub fn path_with_cache() -> Result<String, Error> {
    let current = std::env::var("PATH").unwrap_or_default();
    Ok(format!("{}:{current}", farm_dir().display()))
}

/// `cargo xtask env`: shell lines for `eval`.
pub fn print_env() -> Result<(), Error> {
    let farm = farm_dir();
    if !farm.join("kubectl").exists() {
        return Err(Error::Usage(format!(
            "{} has no binaries yet; run `cargo xtask deps` first",
            farm.display()
        )));
    }
    let cache = Cache::from_env();
    println!(
        "export TETHER_CACHE_DIR={}",
        shell_quote(&cache.root().display().to_string())
    );
    println!(
        "export PATH={}:\"$PATH\"",
        shell_quote(&farm.display().to_string())
    );
    Ok(())
}

/// Single-quotes `s` for POSIX shells.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a b"), "'/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
