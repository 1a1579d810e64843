//! The Debian host: its release, its apt sources, and installing packages from them.
//!
//! Tether takes containerd, runc, CNI plugins, iPXE, qemu and friends from Debian's
//! packages. Package sources are always the host's own apt configuration (filtered to the
//! host's release), so nothing here names a mirror.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// The host's Debian codename (`bookworm`).
pub fn host_release() -> Result<String> {
    let text =
        fs::read_to_string("/etc/os-release").map_err(Error::io("read", "/etc/os-release"))?;
    parse_codename(&text).ok_or_else(|| {
        Error::Host("/etc/os-release has no VERSION_CODENAME: Tether needs a Debian host".into())
    })
}

pub fn parse_codename(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The host's apt sources for `release` (and its -updates/-security suites), as deb822.
pub fn host_sources(release: &str) -> Result<String> {
    let mut text = String::new();
    for path in ["/etc/apt/sources.list".into()].into_iter().chain(
        fs::read_dir("/etc/apt/sources.list.d")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    ) {
        let path: PathBuf = path;
        let Ok(content) = fs::read_to_string(&path) else {
            continue;
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "sources" {
            text.push_str(&filter_deb822(&content, release));
        } else if ext == "list" || path.ends_with("sources.list") {
            text.push_str(&filter_one_line(&content, release));
        }
    }
    if text.trim().is_empty() {
        return Err(Error::Host(format!(
            "no apt source for {release} found in /etc/apt"
        )));
    }
    Ok(text)
}

fn suite_ok(suite: &str, release: &str) -> bool {
    suite == release
        || ["-updates", "-security"]
            .iter()
            .any(|s| suite == format!("{release}{s}"))
}

/// Keeps the deb822 stanzas whose suites belong to `release` (other suites are dropped from
/// the stanza; a stanza left with none is dropped).
pub fn filter_deb822(content: &str, release: &str) -> String {
    let mut out = String::new();
    for stanza in content.split("\n\n") {
        let lines: Vec<&str> = stanza
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        let enabled = !lines
            .iter()
            .any(|l| l.trim().eq_ignore_ascii_case("enabled: no"));
        let types_deb = lines
            .iter()
            .any(|l| l.starts_with("Types:") && l.split_whitespace().any(|t| t == "deb"));
        let suites: Vec<&str> = lines
            .iter()
            .find_map(|l| l.strip_prefix("Suites:"))
            .map(|s| {
                s.split_whitespace()
                    .filter(|s| suite_ok(s, release))
                    .collect()
            })
            .unwrap_or_default();
        if !enabled || !types_deb || suites.is_empty() {
            continue;
        }
        for l in &lines {
            if l.starts_with("Suites:") {
                out.push_str(&format!("Suites: {}\n", suites.join(" ")));
            } else if l.starts_with("Types:") {
                out.push_str("Types: deb\n");
            } else {
                out.push_str(l);
                out.push('\n');
            }
        }
        out.push('\n');
    }
    out
}

/// Converts one-line `deb URI SUITE COMPONENTS` entries for `release` to deb822.
pub fn filter_one_line(content: &str, release: &str) -> String {
    let mut out = String::new();
    for line in content.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        let mut options = String::new();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            while let Some(w) = rest.first().copied() {
                rest.remove(0);
                options.push_str(w.trim_matches(['[', ']']));
                options.push(' ');
                if w.ends_with(']') {
                    break;
                }
            }
        }
        let [uri, suite, components @ ..] = rest.as_slice() else {
            continue;
        };
        if !suite_ok(suite, release) || components.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: {}\n",
            components.join(" ")
        ));
        for opt in options.split_whitespace() {
            if let Some(key) = opt.strip_prefix("signed-by=") {
                out.push_str(&format!("Signed-By: {key}\n"));
            }
        }
        out.push('\n');
    }
    out
}

/// The Debian packages the project needs on a build/test host.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "ipxe-qemu",
    "ipxe",
    "ovmf",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "systemd-container",
    "busybox-static",
    "squashfs-tools",
    "erofs-utils",
    "cpio",
    "zstd",
    "mmdebstrap",
    "debootstrap",
    "iproute2",
    "e2fsprogs",
    "dosfstools",
    "mtools",
    "gdisk",
    "cryptsetup-bin",
    "systemd-boot-efi",
    // tether-pxe: the boot tests' kernel, and the reference servers of `xtask bench pxe`.
    "linux-image-amd64",
    "dnsmasq-base",
    "nginx-light",
    // The reference client of `xtask bench store`.
    "curl",
    // tether-operator: PostgreSQL for the kine datastore test (initdb/pg_ctl/psql), openssl
    // to cross-check the CA pin the way kubeadm documents it.
    "postgresql",
    "openssl",
    // runc is built with cgo and linked statically with libseccomp.
    "gcc",
    "libc6-dev",
    "libseccomp-dev",
    "pkg-config",
];

/// Packages that must come from backports when the host already runs backports' qemu
/// (qemu-utils and qemu-system-x86 must be of one version).
const QEMU_PACKAGES: &[&str] = &["qemu-system-x86", "ipxe-qemu"];

/// The installed version of `package`, if it is installed.
pub fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}|${Version}", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('|')?;
    status.starts_with("ii").then(|| version.trim().to_string())
}

/// What [`ensure_packages`] did.
#[derive(Debug, Default)]
pub struct PackageReport {
    /// Packages that had to be installed.
    pub installed: Vec<String>,
    /// Whether qemu was taken from backports.
    pub from_backports: Vec<String>,
}

/// Installs whichever of `packages` are missing (with apt, non-interactively); does nothing
/// when all are present. When backports' qemu-utils is installed, qemu comes from backports
/// too, and the backports suite is added to apt's sources (from the host's own mirror).
pub fn ensure_packages(packages: &[&str]) -> Result<PackageReport> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| installed_version(p).is_none())
        .collect();
    let mut report = PackageReport::default();
    if missing.is_empty() {
        return Ok(report);
    }
    if !nix_is_root() {
        return Err(Error::Host(format!(
            "missing Debian packages: {}; run as root or `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        )));
    }
    let backports_qemu = installed_version("qemu-utils").is_some_and(|v| is_backports_version(&v));
    let (qemu, rest): (Vec<&str>, Vec<&str>) = missing
        .iter()
        .partition(|p| backports_qemu && QEMU_PACKAGES.contains(p));
    let release = host_release()?;
    if !qemu.is_empty() {
        ensure_backports_source(&release)?;
    }
    apt(&["update", "-q"])?;
    if !qemu.is_empty() {
        let target = format!("{release}-backports");
        let mut args = vec![
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            &target,
        ];
        args.extend(qemu.iter().copied());
        apt(&args)?;
        report.from_backports = qemu.iter().map(|s| s.to_string()).collect();
    }
    if !rest.is_empty() {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(rest.iter().copied());
        apt(&args)?;
    }
    report.installed = missing.iter().map(|s| s.to_string()).collect();
    Ok(report)
}

/// Debian backports versions carry `~bpo` (e.g. `1:9.2.3+ds-1~bpo12+1`).
pub fn is_backports_version(version: &str) -> bool {
    version.contains("~bpo")
}

/// Adds `<release>-backports` to apt's sources, copying the host's mirror for `release`.
fn ensure_backports_source(release: &str) -> Result<()> {
    let path = PathBuf::from("/etc/apt/sources.list.d/tether-backports.sources");
    if path.exists() {
        return Ok(());
    }
    let sources = host_sources(release)?;
    let stanza = backports_stanza(&sources, release).ok_or_else(|| {
        Error::Host(format!(
            "no apt source for {release} to derive backports from"
        ))
    })?;
    fs::write(&path, stanza).map_err(Error::io("write", &path))
}

/// A deb822 stanza for `<release>-backports` on the mirror that serves `release` itself.
pub fn backports_stanza(sources: &str, release: &str) -> Option<String> {
    sources.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let suites = field("Suites:")?;
        if !suites.split_whitespace().any(|s| s == release) {
            return None;
        }
        let mut out = format!(
            "Types: deb\nURIs: {}\nSuites: {release}-backports\nComponents: {}\n",
            field("URIs:")?,
            field("Components:")?
        );
        if let Some(key) = field("Signed-By:") {
            out.push_str(&format!("Signed-By: {key}\n"));
        }
        Some(out)
    })
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .map_err(Error::io("run", "apt-get"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Host(format!(
            "`apt-get {}` failed ({status})",
            args.join(" ")
        )))
    }
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backports_from_host_mirror() {
        let sources = "Types: deb\nURIs: http://m.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://m.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            backports_stanza(sources, "bookworm").as_deref(),
            Some(
                "Types: deb\nURIs: http://m.invalid/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /k.gpg\n"
            )
        );
        assert_eq!(backports_stanza(sources, "trixie"), None);
        assert!(is_backports_version("1:9.2.3+ds-1~bpo12+1"));
        assert!(!is_backports_version("1:7.2+dfsg-7+deb12u13"));
    }

    #[test]
    fn codename() {
        assert_eq!(
            parse_codename("ID=debian\nVERSION_CODENAME=bookworm\n").as_deref(),
            Some("bookworm")
        );
        assert_eq!(parse_codename("ID=x\n"), None);
        assert_eq!(parse_codename("VERSION_CODENAME=\n"), None);
    }

    #[test]
    fn deb822_keeps_only_release_suites() {
        let input = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates bookworm-backports\nComponents: main\n\nTypes: deb\nURIs: http://other.invalid/apt\nSuites: cloud-sdk-bookworm\nComponents: main\n\n# comment\nTypes: deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n";
        let got = filter_deb822(input, "bookworm");
        assert!(got.contains("Suites: bookworm bookworm-updates\n"));
        assert!(!got.contains("backports"));
        assert!(!got.contains("other.invalid"));
        assert_eq!(got.matches("Types: deb\n").count(), 1);
    }

    #[test]
    fn one_line_sources_become_deb822() {
        let input = "deb [arch=amd64 signed-by=/k.gpg] http://m.invalid/debian bookworm main contrib\ndeb http://m.invalid/debian-security bookworm-security main\ndeb http://x.invalid nodistro main\n# deb http://m.invalid/debian bookworm main\n";
        let got = filter_one_line(input, "bookworm");
        assert!(got.contains("URIs: http://m.invalid/debian\nSuites: bookworm\nComponents: main contrib\nSigned-By: /k.gpg\n"));
        assert!(got.contains("Suites: bookworm-security\n"));
        assert!(!got.contains("nodistro"));
    }
}
