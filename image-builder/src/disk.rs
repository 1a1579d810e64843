//! `disk.raw`: the image as an installable GPT disk — what disk installs and A/B upgrades
//! start from.
//!
//! Layout ([`gpt::layout`]): an ESP (FAT, made with `mkfs.vfat`, filled with mtools — no loop
//! mounts, so no root needed for this step) holding Debian's systemd-boot as
//! `EFI/BOOT/BOOTX64.EFI` and `EFI/systemd/systemd-bootx64.efi`, `loader/loader.conf`, each
//! slot's kernel and initramfs under `tether/<slot>/` and one Boot Loader Spec entry per slot
//! with boot counting (`tether-a+3.conf`, `tether-b+3.conf`); the slots `tether-a` and
//! `tether-b`, each holding the rootfs with its verity tree appended; and `tether-state`, an
//! empty ext4 for the persistent `/etc` and `/var` overlays.
//!
//! Decisions (docs/image.md): slot B starts as a byte copy of slot A, with its own entry, so a
//! fresh install already has a bootable fallback and an upgrade always overwrites the slot
//! it did not boot from. The state partition is formatted here (the initramfs has no mkfs),
//! empty. Reproducible: the disk and partition GUIDs, the FAT volume id and the ext4 UUID and
//! hash seed are derived from the verity root hash and the version; mtools and mke2fs get the
//! SOURCE_DATE_EPOCH, mkfs.vfat runs with `--invariant`; the file is sparse.

use std::fs;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use tether_boot::manifest::Verity;
use tether_boot::slot::{self, BOOT_TRIES, STATE_LABEL, Slot};

use crate::boot::slot_cmdline;
use crate::gpt::{self, Layout, SECTOR};
use crate::{Error, Result};

/// Debian's systemd-boot (package systemd-boot-efi).
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

const MIB: u64 = 1 << 20;

/// What goes onto the disk: the image's files and the words its entries boot with.
#[derive(Debug, Clone)]
pub struct DiskInputs<'a> {
    /// Directory holding `vmlinuz`, `initramfs` and `rootfs_file`.
    pub dir: &'a Path,
    /// The rootfs file name (`rootfs.squashfs`).
    pub rootfs_file: &'a str,
    /// Image version (entry titles, GUID derivation).
    pub version: &'a str,
    /// The spec's extra command line words.
    pub extra_cmdline: &'a str,
    /// Rootfs file system type.
    pub fstype: &'a str,
    /// The rootfs's verity parameters (both slots hold the same bytes).
    pub verity: &'a Verity,
    /// SOURCE_DATE_EPOCH for FAT and ext4 timestamps.
    pub epoch: u64,
}

/// The state partition: a joined node keeps its runtime (~190 MB of binaries), containerd's
/// images and the pods' writable layers there. At 256 MiB the kubelet evicted the first pod
/// for disk pressure; `disk.raw` is sparse, so the empty space costs no bytes on the host.
pub const STATE_SIZE: u64 = 2048 * MIB;

/// Partition sizes for given artifact sizes: the ESP holds both slots' kernel + initramfs
/// with room for them to double (at least 64 MiB); a slot holds twice the rootfs (at least
/// 256 MiB), rounded to 64 MiB, so upgrades to a larger image still fit; the state
/// partition is [`STATE_SIZE`] (growing it to the disk is an install step, not done here).
pub fn sizes(kernel: u64, initramfs: u64, rootfs: u64) -> (u64, u64, u64) {
    let round64 = |b: u64| b.div_ceil(64 * MIB) * 64 * MIB;
    let esp = round64((4 * (kernel + initramfs) + 4 * MIB).max(64 * MIB));
    let slot = round64((2 * rootfs).max(256 * MIB));
    (esp, slot, STATE_SIZE)
}

/// A GUID (RFC 4122 text form, version-4 shaped) derived from `seed` and `what`: stable for
/// the same image, distinct between images and between partitions.
pub fn derived_guid(seed: &str, what: &str) -> String {
    let h = Sha256::digest(format!("tether-disk\0{seed}\0{what}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b).to_ascii_uppercase();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// The files of the ESP, relative to its root, with their contents (small ones) or source
/// paths (large ones).
fn esp_files(inputs: &DiskInputs) -> Result<Vec<(String, EspFile)>> {
    let mut files = vec![
        (
            "EFI/BOOT/BOOTX64.EFI".to_string(),
            EspFile::Copy(SYSTEMD_BOOT_EFI.into()),
        ),
        (
            "EFI/systemd/systemd-bootx64.efi".to_string(),
            EspFile::Copy(SYSTEMD_BOOT_EFI.into()),
        ),
        (
            "loader/loader.conf".to_string(),
            EspFile::Text(slot::loader_conf()),
        ),
    ];
    for slot in Slot::ALL {
        let cmdline = slot_cmdline(inputs.extra_cmdline, slot, inputs.fstype, inputs.verity)?;
        files.push((
            format!("loader/entries/{}", slot.entry_file_name(Some(BOOT_TRIES))),
            EspFile::Text(slot.bls_entry(inputs.version, &cmdline)),
        ));
        for f in ["vmlinuz", "initramfs"] {
            files.push((
                format!("{}/{f}", slot.esp_dir()),
                EspFile::Copy(inputs.dir.join(f)),
            ));
        }
    }
    Ok(files)
}

enum EspFile {
    Text(String),
    Copy(std::path::PathBuf),
}

/// The mtools image spec for the ESP inside `disk` (`disk.raw@@1048576`).
pub fn esp_image_arg(disk: &Path, layout: &Layout) -> String {
    format!(
        "{}@@{}",
        disk.display(),
        layout.partitions[0].first_lba * SECTOR
    )
}

/// Writes `out` (normally `disk.raw` in the build's staging directory).
pub fn write_disk(inputs: &DiskInputs, out: &Path) -> Result<Layout> {
    let size_of = |name: &str| -> Result<u64> {
        let p = inputs.dir.join(name);
        Ok(fs::metadata(&p).map_err(Error::io("stat", &p))?.len())
    };
    let rootfs_size = size_of(inputs.rootfs_file)?;
    let (esp, slot, state) = sizes(size_of("vmlinuz")?, size_of("initramfs")?, rootfs_size);
    let layout = gpt::layout(esp, slot, state);
    if !Path::new(SYSTEMD_BOOT_EFI).is_file() {
        return Err(Error::MissingTool {
            tool: SYSTEMD_BOOT_EFI.into(),
            hint: "install Debian's systemd-boot-efi (`cargo xtask deps`)".into(),
        });
    }
    let seed = format!("{}\0{}", inputs.version, inputs.verity.root_hash);
    let epoch = inputs.epoch.to_string();

    let _ = fs::remove_file(out);
    let f = fs::File::create(out).map_err(Error::io("create", out))?;
    f.set_len(layout.disk_size)
        .map_err(Error::io("size", out))?;
    drop(f);

    // Partition table.
    let mut sgdisk = Command::new("sgdisk");
    sgdisk
        .arg("--clear")
        .arg(format!("--disk-guid={}", derived_guid(&seed, "disk")));
    for (i, p) in layout.partitions.iter().enumerate() {
        let n = i + 1;
        sgdisk
            .arg(format!("--new={n}:{}:{}", p.first_lba, p.last_lba))
            .arg(format!("--typecode={n}:{}", p.type_guid))
            .arg(format!("--change-name={n}:{}", p.name))
            .arg(format!(
                "--partition-guid={n}:{}",
                derived_guid(&seed, p.name)
            ));
    }
    sgdisk.arg(out);
    run(&mut sgdisk)?;

    // ESP: FAT straight into the partition, then the files with mtools.
    let espp = &layout.partitions[0];
    let volid = &derived_guid(&seed, "esp-volume")[..8];
    run(Command::new("mkfs.vfat")
        .args(["--invariant", "-F", "16", "-n", "ESP", "-i", volid])
        .arg(format!("--offset={}", espp.first_lba))
        .arg(out)
        .arg((espp.size() / 1024).to_string()))?;
    let img = esp_image_arg(out, &layout);
    let mtools = |args: &[&str]| -> Result<String> {
        run(Command::new(args[0])
            .args(["-i", &img])
            .args(&args[1..])
            .env("SOURCE_DATE_EPOCH", &epoch)
            .env("MTOOLS_SKIP_CHECK", "1"))
    };
    for dir in [
        "EFI",
        "EFI/BOOT",
        "EFI/systemd",
        "loader",
        "loader/entries",
        "tether",
        "tether/a",
        "tether/b",
    ] {
        mtools(&["mmd", &format!("::/{dir}")])?;
    }
    let scratch = tempdir_next_to(out)?;
    for (i, (dest, file)) in esp_files(inputs)?.into_iter().enumerate() {
        let src = match file {
            EspFile::Copy(p) => p,
            EspFile::Text(t) => {
                let p = scratch.join(i.to_string());
                fs::write(&p, t).map_err(Error::io("write", &p))?;
                p
            }
        };
        // Without -m mcopy stamps SOURCE_DATE_EPOCH.
        let r = mtools(&["mcopy", "-o", &src.to_string_lossy(), &format!("::/{dest}")]);
        if let Err(e) = r {
            let _ = fs::remove_dir_all(&scratch);
            return Err(e);
        }
    }
    let _ = fs::remove_dir_all(&scratch);

    // Both slots: the rootfs (verity tree included) byte for byte.
    let rootfs = inputs.dir.join(inputs.rootfs_file);
    for p in &layout.partitions[1..3] {
        if rootfs_size > p.size() {
            return Err(Error::Verify(format!(
                "{} ({rootfs_size} bytes) does not fit slot {} ({} bytes)",
                rootfs.display(),
                p.name,
                p.size()
            )));
        }
        let mut src = fs::File::open(&rootfs).map_err(Error::io("open", &rootfs))?;
        let mut dst = fs::OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(Error::io("open", out))?;
        dst.seek(SeekFrom::Start(p.first_lba * SECTOR))
            .map_err(Error::io("seek", out))?;
        std::io::copy(&mut src, &mut dst).map_err(Error::io("copy", &rootfs))?;
    }

    // State: an empty ext4, reproducible.
    let st = &layout.partitions[3];
    let uuid = derived_guid(&seed, "state-fs").to_ascii_lowercase();
    let hash_seed = derived_guid(&seed, "state-hash").to_ascii_lowercase();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", STATE_LABEL, "-U", &uuid])
        .arg("-E")
        .arg(format!(
            "offset={},hash_seed={hash_seed},nodiscard,root_owner=0:0,lazy_itable_init=0",
            st.first_lba * SECTOR
        ))
        .arg(out)
        .arg((st.size() / 4096).to_string())
        .env("E2FSPROGS_FAKE_TIME", &epoch))?;
    let f = fs::File::open(out).map_err(Error::io("open", out))?;
    f.sync_all().map_err(Error::io("sync", out))?;
    Ok(layout)
}

fn tempdir_next_to(out: &Path) -> Result<std::path::PathBuf> {
    let dir = out.with_extension(format!("esp-files-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    Ok(dir)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(Error::io("run", cmd.get_program()))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!(
                "{} {}",
                cmd.get_program().to_string_lossy(),
                cmd.get_args()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_have_headroom() {
        type Case = ((u64, u64, u64), (u64, u64, u64));
        let cases: &[Case] = &[
            // today's image: 8.2 MB kernel, 5.6 MB initramfs, 106 MB rootfs
            (
                (8_200_000, 5_600_000, 106_400_000),
                (64 * MIB, 256 * MIB, STATE_SIZE),
            ),
            // a larger one: slots double the rootfs, ESP four times kernel+initramfs
            (
                (20 * MIB, 20 * MIB, 300 * MIB),
                (192 * MIB, 640 * MIB, STATE_SIZE),
            ),
        ];
        for ((k, i, r), want) in cases {
            assert_eq!(sizes(*k, *i, *r), *want, "{k} {i} {r}");
        }
    }

    #[test]
    fn missing_inputs_fail_before_writing() {
        let t = tempfile::tempdir().unwrap();
        let v = Verity {
            root_hash: "ab".into(),
            hash_offset: 4096,
            salt: "00".into(),
            algorithm: "sha256".into(),
        };
        let out = t.path().join("disk.raw");
        let err = write_disk(
            &DiskInputs {
                dir: t.path(),
                rootfs_file: "rootfs.squashfs",
                version: "1",
                extra_cmdline: "",
                fstype: "squashfs",
                verity: &v,
                epoch: 0,
            },
            &out,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("stat") && err.contains("rootfs.squashfs"),
            "{err}"
        );
        assert!(!out.exists(), "nothing written");
    }

    #[test]
    fn guids_are_stable_and_distinct() {
        let a = derived_guid("1.0\0abc", "disk");
        assert_eq!(a, derived_guid("1.0\0abc", "disk"));
        assert_ne!(a, derived_guid("1.0\0abd", "disk"));
        assert_ne!(a, derived_guid("1.0\0abc", "tether-a"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4", "version nibble: {a}");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
