//! Rendering what boots an image: the kernel command lines (PXE, and each A/B slot's disk
//! entry) through the shared [`BootParams`], and the `BootImage` object for the operator.

use std::collections::BTreeMap;

use serde::Serialize;
use tether_api::machine::{Artifact, BootImageSpec};
use tether_boot::cmdline::{BootParams, Root, VerityParams};
use tether_boot::manifest::{Manifest, Verity};
use tether_boot::slot::{STATE_LABEL, Slot};

use crate::{Error, Result};

/// The spec's own words as `BootParams`; a spec may not set what the builder decides.
pub fn spec_params(extra: &str) -> Result<BootParams> {
    let invalid = |reason: String| Error::SpecInvalid {
        field: "cmdline".into(),
        reason,
    };
    use tether_boot::cmdline::{
        MAC, ROOT, ROOTFS_TYPE, SLOT, STATE, TOKEN, VERITY_HASH_OFFSET, VERITY_ROOT_HASH,
    };
    const OWNED: &[&str] = &[
        ROOT,
        ROOTFS_TYPE,
        VERITY_ROOT_HASH,
        VERITY_HASH_OFFSET,
        STATE,
        SLOT,
        MAC,
        TOKEN,
        "root",
        "init",
        "rdinit",
    ];
    if let Some(word) = extra
        .split_whitespace()
        .find(|w| OWNED.contains(&w.split('=').next().unwrap_or_default()))
    {
        return Err(invalid(format!(
            "{word:?} is set by the builder (or per machine) and may not be given"
        )));
    }
    let p = BootParams::parse(extra).map_err(|e| invalid(e.to_string()))?;
    Ok(p)
}

/// Seconds a node waits after a kernel panic before it reboots (`panic=`), unless the spec
/// sets its own: a node that panics comes back by itself instead of hanging until someone
/// reaches its console (DESIGN.md "The node contract").
pub const PANIC_REBOOT_SECONDS: u32 = 10;

fn image_params(extra: &str, root: Root, fstype: &str, verity: &Verity) -> Result<BootParams> {
    let mut p = spec_params(extra)?;
    if !p.other.iter().any(|w| w.starts_with("panic=")) {
        p.other.push(format!("panic={PANIC_REBOOT_SECONDS}"));
    }
    p.root = Some(root);
    p.rootfs_type = Some(fstype.to_string());
    p.verity = Some(VerityParams {
        root_hash: verity.root_hash.clone(),
        hash_offset: verity.hash_offset,
    });
    Ok(p)
}

fn render(p: &BootParams) -> Result<String> {
    p.render().map_err(|e| Error::SpecInvalid {
        field: "cmdline".into(),
        reason: e.to_string(),
    })
}

/// The PXE command line: the spec's words, then the rootfs as the file the second initrd
/// unpacks, its type and verity parameters. tether-pxe appends the per-machine words.
pub fn pxe_cmdline(extra: &str, fstype: &str, verity: &Verity) -> Result<String> {
    render(&image_params(extra, Root::pxe(), fstype, verity)?)
}

/// The command line of a slot's disk entry: the slot's partition, the state partition and
/// `tether.slot=`.
pub fn slot_cmdline(extra: &str, slot: Slot, fstype: &str, verity: &Verity) -> Result<String> {
    let mut p = image_params(
        extra,
        Root::PartLabel(slot.partition_label()),
        fstype,
        verity,
    )?;
    p.state = Some(Root::PartLabel(STATE_LABEL.into()));
    p.slot = Some(slot);
    render(&p)
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
    use tether_boot::manifest::ArtifactDigest;

    const HASH: &str = "ab0123456789abcdef0123456789abcdef";

    fn verity() -> Verity {
        Verity {
            root_hash: HASH.into(),
            hash_offset: 8192,
            salt: "00".into(),
            algorithm: "sha256".into(),
        }
    }

    #[test]
    fn pxe_cmdline_appends_root_and_verity() {
        assert_eq!(
            pxe_cmdline(" console=ttyS0  quiet ", "squashfs", &verity()).unwrap(),
            format!(
                "console=ttyS0 quiet panic=10 tether.root=file:/rootfs.img tether.rootfstype=squashfs tether.verity.roothash={HASH} tether.verity.hashoffset=8192"
            )
        );
    }

    #[test]
    fn slot_cmdlines() {
        assert_eq!(
            slot_cmdline("console=ttyS0", Slot::B, "squashfs", &verity()).unwrap(),
            format!(
                "console=ttyS0 panic=10 tether.root=PARTLABEL=tether-b tether.rootfstype=squashfs tether.verity.roothash={HASH} tether.verity.hashoffset=8192 tether.state=PARTLABEL=tether-state tether.slot=b"
            )
        );
    }

    #[test]
    fn a_spec_panic_word_is_kept() {
        let line = pxe_cmdline("panic=-1 console=ttyS0", "squashfs", &verity()).unwrap();
        assert!(
            line.starts_with("panic=-1 console=ttyS0 tether.root="),
            "{line}"
        );
        assert_eq!(line.matches("panic=").count(), 1);
    }

    #[test]
    fn spec_words_the_builder_owns_are_refused() {
        for bad in [
            "root=/dev/sda",
            "init=/bin/sh",
            "tether.root=file:/x",
            "tether.slot=a",
            "tether.token=abcdef.0123456789abcdef",
            "tether.mac=52:54:00:00:00:01",
            "tether.api=ftp://x",
        ] {
            assert!(spec_params(bad).is_err(), "{bad}");
        }
        // A site may bake its machine API and pin into an image.
        let p = spec_params(&format!(
            "quiet tether.api=https://10.0.0.1:9443 tether.ca=sha256:{}",
            "0".repeat(64)
        ))
        .unwrap();
        assert!(p.api.is_some() && p.ca.is_some());
    }

    #[test]
    fn initramfs_reads_the_shared_keys() {
        let init = include_str!("initramfs/init.sh");
        let read: Vec<&str> = init
            .lines()
            .filter_map(|l| l.trim().split_once("=*)").map(|(k, _)| k))
            .filter(|k| k.starts_with("tether."))
            .collect();
        assert_eq!(read, tether_boot::cmdline::INITRAMFS_KEYS);
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
