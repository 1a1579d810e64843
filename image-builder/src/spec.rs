//! The declarative image spec (`tether-image build SPEC`): a small TOML file that names the
//! image version, the extra Debian packages and the output options. Everything else (the
//! base package set, the units, the initramfs) is fixed by the builder so that two specs
//! that look the same build the same image.
//!
//! Paths in the spec are relative to the spec file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// Packages every image has: init, the bus the agent drives systemd over, networking,
/// module loading and trust roots. The container runtime is not among them: containerd 2.x,
/// runc and the CNI plugins come pinned from the artifact store (Kubernetes 1.36 needs
/// containerd 2.x, bookworm ships 1.6; docs/node-runtime.md).
pub const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    // The CNI bridge plugin's masquerade rule and portmap's hostPort rules go through the
    // iptables command (nft backend).
    "iptables",
    // Writes /run/systemd/resolve/resolv.conf from the DNS servers DHCP hands out; the
    // image's /etc/resolv.conf points there (not at the 127.0.0.53 stub, which pods
    // inheriting the node's resolv.conf could not reach).
    "systemd-resolved",
    "kmod",
    "ca-certificates",
    // TLS needs a sane clock: NTP servers come from DHCP through networkd (DESIGN.md "The
    // node contract"); the agent waits for a plausible clock before enrolling.
    "systemd-timesyncd",
    // Loads the drivers of the hardware it finds (a NIC's module, at the least) and makes
    // /dev/disk/by-label (a NoCloud `cidata` volume).
    "udev",
    // Build inputs of the initramfs (taken from the image's own packages, so they are
    // pinned with it); veritysetup also lets the agent check a new A/B slot.
    "busybox-static",
    "cryptsetup-bin",
];

/// Packages an image must never contain: a node is not logged into, and its software
/// changes only by image.
pub const FORBIDDEN_PACKAGES: &[&str] = &["openssh-server", "dropbear", "dropbear-bin"];

/// The read-only rootfs format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsFormat {
    /// squashfs, zstd-compressed (the default: smaller here, see docs/image.md).
    #[default]
    Squashfs,
    /// EROFS, lz4hc-compressed.
    Erofs,
}

impl RootfsFormat {
    /// The file system type name the kernel knows it by.
    pub fn fstype(self) -> &'static str {
        match self {
            RootfsFormat::Squashfs => "squashfs",
            RootfsFormat::Erofs => "erofs",
        }
    }
}

/// A parsed, validated image spec.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Image version (`2026.11.1`): letters, digits, `.`, `-`, `_`, `+`.
    pub version: String,
    /// Debian packages added to [`BASE_PACKAGES`].
    #[serde(default)]
    pub packages: Vec<String>,
    /// Rootfs format.
    #[serde(default)]
    pub rootfs_format: RootfsFormat,
    /// Extra kernel command line words (the builder adds the root and verity ones).
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// The `tether-agent` binary to bake in (`--agent` overrides).
    #[serde(default)]
    pub agent: Option<PathBuf>,
    /// The ed25519 signing key made by `tether-image keygen` (`--key` overrides).
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Directory of systemd units to install and enable (default: the repo's `systemd/`).
    #[serde(default)]
    pub units: Option<PathBuf>,
    /// Prefix for artifact URLs in `bootimage.yaml` (empty: bare file names).
    #[serde(default)]
    pub url_base: String,
    /// Also write `disk.raw` (GPT, systemd-boot, A/B slots, state; see `disk.rs`).
    #[serde(default)]
    pub disk: bool,
}

fn default_cmdline() -> String {
    "console=tty0 console=ttyS0".into()
}

impl Spec {
    /// Reads and validates the spec at `path`, resolving its relative paths.
    pub fn load(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path).map_err(Error::io("read spec", path))?;
        let mut spec = Spec::parse(&text).map_err(|e| match e {
            Error::SpecParse { detail, .. } => Error::SpecParse {
                path: path.to_path_buf(),
                detail,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut spec.agent, &mut spec.signing_key, &mut spec.units]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(spec)
    }

    /// Parses and validates spec text (paths left as written).
    pub fn parse(text: &str) -> Result<Spec> {
        let spec: Spec = toml::from_str(text).map_err(|e| Error::SpecParse {
            path: PathBuf::from("<spec>"),
            detail: e.to_string().trim().to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every value; the first bad one is the error.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| Error::SpecInvalid {
            field: field.into(),
            reason,
        };
        if self.version.is_empty() || self.version.len() > 63 {
            return Err(invalid("version", "must be 1 to 63 characters".into()));
        }
        if !self
            .version
            .chars()
            .next()
            .unwrap_or('-')
            .is_ascii_alphanumeric()
            || !self
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_+".contains(c))
        {
            return Err(invalid(
                "version",
                format!(
                    "{:?} must start with a letter or digit and hold only letters, digits, '.', '-', '_', '+'",
                    self.version
                ),
            ));
        }
        for p in &self.packages {
            if !valid_package_name(p) {
                return Err(invalid(
                    "packages",
                    format!("{p:?} is not a Debian package name"),
                ));
            }
            if FORBIDDEN_PACKAGES.contains(&p.as_str()) {
                return Err(invalid(
                    "packages",
                    format!("{p:?} is not allowed: images have no SSH server"),
                ));
            }
        }
        if self.cmdline.chars().any(|c| c.is_control()) {
            return Err(invalid("cmdline", "must be one line".into()));
        }
        crate::boot::spec_params(&self.cmdline)?;
        if self.cmdline.len() > 1024 {
            return Err(invalid("cmdline", "longer than 1024 bytes".into()));
        }
        if !self.url_base.is_empty() && self.url_base.chars().any(|c| c.is_whitespace()) {
            return Err(invalid("url_base", "may not contain whitespace".into()));
        }
        Ok(())
    }

    /// Base plus extra packages, sorted and without duplicates.
    pub fn all_packages(&self) -> Vec<String> {
        let mut all: Vec<String> = BASE_PACKAGES
            .iter()
            .map(|s| s.to_string())
            .chain(self.packages.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Debian policy 5.6.1: lower-case letters, digits, `+ - .`, at least two characters,
/// starting with a letter or digit.
pub fn valid_package_name(name: &str) -> bool {
    name.len() >= 2
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec = Spec::parse("version = \"2026.11.1\"\n").unwrap();
        assert_eq!(spec.rootfs_format, RootfsFormat::Squashfs);
        assert_eq!(spec.cmdline, "console=tty0 console=ttyS0");
        assert!(!spec.disk);
        assert!(spec.all_packages().contains(&"systemd".to_string()));
        assert!(!spec.all_packages().contains(&"containerd".to_string()));
    }

    #[test]
    fn full_spec() {
        let spec = Spec::parse(
            "version = \"1.0\"\npackages = [\"htop\", \"kmod\"]\nrootfs_format = \"erofs\"\ncmdline = \"quiet\"\nagent = \"a\"\nsigning_key = \"k\"\nurl_base = \"http://pxe/\"\ndisk = true\n",
        )
        .unwrap();
        assert_eq!(spec.rootfs_format, RootfsFormat::Erofs);
        assert!(spec.disk);
        let all = spec.all_packages();
        assert_eq!(
            all.iter().filter(|p| *p == "kmod").count(),
            1,
            "deduplicated"
        );
        assert!(all.windows(2).all(|w| w[0] < w[1]), "sorted");
    }

    #[test]
    fn bad_specs_say_why() {
        let cases: &[(&str, &str)] = &[
            ("", "missing field `version`"),
            ("version = 3", "invalid type"),
            ("version = \"1\"\nfoo = 1", "unknown field `foo`"),
            ("version = \"\"", "version: must be 1 to 63"),
            ("version = \"a/b\"", "version: \"a/b\" must start"),
            ("version = \"-a\"", "version: \"-a\" must start"),
            (
                "version = \"1\"\npackages = [\"Bad_Name\"]",
                "not a Debian package name",
            ),
            (
                "version = \"1\"\npackages = [\"x\"]",
                "not a Debian package name",
            ),
            (
                "version = \"1\"\npackages = [\"openssh-server\"]",
                "no SSH server",
            ),
            (
                "version = \"1\"\nrootfs_format = \"ext4\"",
                "unknown variant `ext4`",
            ),
            (
                "version = \"1\"\ncmdline = \"root=/dev/sda\"",
                "set by the builder",
            ),
            (
                "version = \"1\"\ncmdline = \"tether.verity.roothash=0\"",
                "set by the builder",
            ),
            ("version = \"1\"\ncmdline = \"a\\nb\"", "must be one line"),
            ("version = \"1\"\nurl_base = \"a b\"", "whitespace"),
            ("version = \"1\"\ndisk = \"yes\"", "invalid type"),
        ];
        for (text, want) in cases {
            let err = Spec::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn package_names() {
        for ok in [
            "systemd",
            "libc6",
            "g++",
            "linux-image-6.1.0-28-amd64",
            "0ad",
        ] {
            assert!(valid_package_name(ok), "{ok}");
        }
        for bad in ["", "a", "Systemd", "-x", "a b", "a_b", "pkg;rm"] {
            assert!(!valid_package_name(bad), "{bad}");
        }
    }

    #[test]
    fn load_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "version = \"1\"\nagent = \"bin/agent\"\nsigning_key = \"/abs/k\"\n",
        )
        .unwrap();
        let spec = Spec::load(&path).unwrap();
        assert_eq!(spec.agent.unwrap(), dir.path().join("bin/agent"));
        assert_eq!(spec.signing_key.unwrap(), PathBuf::from("/abs/k"));
        let err = Spec::load(&dir.path().join("none.toml")).unwrap_err();
        assert!(err.to_string().contains("read spec"), "{err}");
    }
}
