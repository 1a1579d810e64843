//! Rendering what boots an image: the `BootImage` object for the operator, Boot Loader
//! Specification entries with boot counting for disk installs, and the kernel command line.
//!
//! Boot counting follows systemd-boot: an entry file named `NAME+LEFT[-DONE].conf` is tried
//! while LEFT > 0; each try renames it to `+(LEFT-1)-(DONE+1)`, and a good boot
//! (`systemd-bless-boot`, or the agent's health gate) renames it to `NAME.conf`. New slots
//! are written with `+3`.

use std::collections::BTreeMap;

use serde::Serialize;
use tether_api::machine::{Artifact, BootImageSpec};

use crate::manifest::{Manifest, Verity};

/// Tries a freshly written slot gets before systemd-boot falls back.
pub const BOOT_TRIES: u32 = 3;

/// Where the initramfs finds the rootfs on a PXE boot: the file the second initrd unpacks.
pub const PXE_ROOTFS_PATH: &str = "/rootfs.img";

/// The kernel command line for an image: the spec's words, then the root and verity ones.
pub fn cmdline(extra: &str, root: &str, fstype: &str, verity: &Verity) -> String {
    let mut words: Vec<String> = extra.split_whitespace().map(String::from).collect();
    words.push(format!("tether.root={root}"));
    words.push(format!("tether.rootfstype={fstype}"));
    words.push(format!("tether.verity.roothash={}", verity.root_hash));
    words.push(format!("tether.verity.hashoffset={}", verity.hash_offset));
    words.join(" ")
}

/// An A/B slot of a disk install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The first slot, installed first.
    A,
    /// The second slot.
    B,
}

impl Slot {
    /// `a` or `b`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// The BLS entry file name for `slot` with `tries` left (`tether-a+3.conf`).
pub fn entry_file_name(slot: Slot, tries: Option<u32>) -> String {
    match tries {
        Some(n) => format!("tether-{}+{n}.conf", slot.name()),
        None => format!("tether-{}.conf", slot.name()),
    }
}

/// Splits a BLS entry file name into its base and boot counters (left, done).
pub fn parse_entry_counter(file: &str) -> Option<(&str, Option<(u32, u32)>)> {
    let stem = file.strip_suffix(".conf")?;
    let Some((base, counter)) = stem.rsplit_once('+') else {
        return Some((stem, None));
    };
    let (left, done) = match counter.split_once('-') {
        Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
        None => (counter.parse().ok()?, 0),
    };
    Some((base, Some((left, done))))
}

/// A Boot Loader Specification type #1 entry for `slot` (paths relative to the ESP).
pub fn bls_entry(version: &str, slot: Slot, cmdline: &str) -> String {
    let s = slot.name();
    format!(
        "title Tether {version} (slot {s})\nversion {version}\nsort-key tether-{s}\nlinux /tether/{s}/vmlinuz\ninitrd /tether/{s}/initramfs\noptions {cmdline} tether.slot={s}\n"
    )
}

/// systemd-boot's `loader/loader.conf`: slot A first, no menu delay.
pub fn loader_conf() -> String {
    "default tether-a*\ntimeout 0\nconsole-mode keep\neditor no\n".into()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootImageObject<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: &'a BootImageSpec,
}

#[derive(Serialize)]
struct Metadata {
    name: String,
}

/// The `BootImage` name for a version: DNS-1123 (`tether-2026-11-1`).
pub fn object_name(version: &str) -> String {
    let mut name: String = format!("tether-{version}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// The role an artifact file plays in a `BootImage`.
pub fn role(file: &str) -> Option<&'static str> {
    match file {
        "vmlinuz" => Some("kernel"),
        "vmlinux" => Some("kernelElf"),
        "initramfs" => Some("initrd"),
        f if f.starts_with("rootfs.") => Some("rootfs"),
        "disk.raw" => Some("disk"),
        "manifest.json" => Some("manifest"),
        _ => None,
    }
}

/// `bootimage.yaml`: the object the operator serves this image by.
pub fn bootimage_yaml(manifest: &Manifest, signature: &str, url_base: &str) -> String {
    let artifacts: BTreeMap<String, Artifact> = manifest
        .artifacts
        .iter()
        .filter_map(|(file, d)| {
            Some((
                role(file)?.to_string(),
                Artifact {
                    url: format!("{url_base}{file}"),
                    sha256: d.sha256.clone(),
                    size: d.size,
                },
            ))
        })
        .collect();
    let spec = BootImageSpec {
        version: manifest.version.clone(),
        artifacts,
        cmdline: manifest.cmdline.clone(),
        manifest_signature: Some(signature.to_string()),
    };
    serde_yaml::to_string(&BootImageObject {
        api_version: "tether.dev/v1alpha1",
        kind: "BootImage",
        metadata: Metadata {
            name: object_name(&manifest.version),
        },
        spec: &spec,
    })
    .expect("BootImage serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ArtifactDigest;

    fn verity() -> Verity {
        Verity {
            root_hash: "abc".into(),
            hash_offset: 8192,
            salt: "00".into(),
            algorithm: "sha256".into(),
        }
    }

    #[test]
    fn cmdline_appends_root_and_verity() {
        assert_eq!(
            cmdline(
                " console=ttyS0  quiet ",
                "file:/rootfs.img",
                "squashfs",
                &verity()
            ),
            "console=ttyS0 quiet tether.root=file:/rootfs.img tether.rootfstype=squashfs tether.verity.roothash=abc tether.verity.hashoffset=8192"
        );
    }

    #[test]
    fn entry_names_and_counters() {
        assert_eq!(
            entry_file_name(Slot::A, Some(BOOT_TRIES)),
            "tether-a+3.conf"
        );
        assert_eq!(entry_file_name(Slot::B, None), "tether-b.conf");
        type Parsed<'a> = Option<(&'a str, Option<(u32, u32)>)>;
        let cases: &[(&str, Parsed)] = &[
            ("tether-a+3.conf", Some(("tether-a", Some((3, 0))))),
            ("tether-a+2-1.conf", Some(("tether-a", Some((2, 1))))),
            ("tether-a+0-3.conf", Some(("tether-a", Some((0, 3))))),
            ("tether-b.conf", Some(("tether-b", None))),
            ("tether-a+x.conf", None),
            ("tether-a+3", None),
        ];
        for (file, want) in cases {
            assert_eq!(parse_entry_counter(file), *want, "{file}");
        }
    }

    #[test]
    fn bls_entry_renders() {
        let e = bls_entry("1.2", Slot::B, "console=ttyS0");
        assert_eq!(
            e,
            "title Tether 1.2 (slot b)\nversion 1.2\nsort-key tether-b\nlinux /tether/b/vmlinuz\ninitrd /tether/b/initramfs\noptions console=ttyS0 tether.slot=b\n"
        );
        assert!(loader_conf().starts_with("default tether-a*\n"));
    }

    #[test]
    fn names() {
        assert_eq!(object_name("2026.11.1"), "tether-2026-11-1");
        assert_eq!(object_name("1.0+Build_7"), "tether-1-0-build-7");
        assert_eq!(object_name(&"9".repeat(80)).len(), 63);
    }

    #[test]
    fn bootimage_yaml_renders_roles() {
        let m = Manifest {
            version: "1.0".into(),
            kernel_release: "k".into(),
            rootfs_format: "squashfs".into(),
            cmdline: "console=ttyS0".into(),
            verity: verity(),
            artifacts: [
                ("vmlinuz", 10u64),
                ("initramfs", 20),
                ("rootfs.squashfs", 30),
                ("unknown.bin", 1),
            ]
            .into_iter()
            .map(|(f, s)| {
                (
                    f.to_string(),
                    ArtifactDigest {
                        size: s,
                        sha256: format!("{f}-sum"),
                    },
                )
            })
            .collect(),
            packages: BTreeMap::new(),
            source_date_epoch: 0,
        };
        let yaml = bootimage_yaml(&m, "SIG", "http://pxe.invalid/images/1.0/");
        let v: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(v["apiVersion"], "tether.dev/v1alpha1");
        assert_eq!(v["kind"], "BootImage");
        assert_eq!(v["metadata"]["name"], "tether-1-0");
        let spec = &v["spec"];
        assert_eq!(spec["manifestSignature"], "SIG");
        assert_eq!(
            spec["artifacts"]["kernel"]["url"],
            "http://pxe.invalid/images/1.0/vmlinuz"
        );
        assert_eq!(spec["artifacts"]["rootfs"]["size"], 30);
        assert_eq!(spec["artifacts"]["initrd"]["sha256"], "initramfs-sum");
        assert!(spec["artifacts"].get("unknown.bin").is_none());
        let back: BootImageSpec = serde_yaml::from_value(spec.clone()).unwrap();
        assert_eq!(back.artifacts.len(), 3);
    }
}
