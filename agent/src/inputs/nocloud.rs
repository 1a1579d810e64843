//! cloud-init NoCloud without cloud-init (cloud-init's `DataSourceNoCloud`, checked against
//! its documentation; see shared/research/node-join-tunnel-upgrade.md §6).
//!
//! Sources, first found wins: a `ds=nocloud;s=<uri>/` seed (kernel command line, else the
//! SMBIOS system serial number) fetched over `http://` or read from `file://`; the local seed
//! directories `/var/lib/cloud/seed/nocloud/` and `…/nocloud-net/`; a vfat or iso9660
//! volume labelled `cidata` or `CIDATA` (found through udev's `/dev/disk/by-label`, mounted
//! read-only for the read and unmounted after). Both `user-data` and `meta-data` must exist
//! (cloud-init skips a seed otherwise); `meta-data` must carry an `instance-id`; the
//! user-data must be the `#cloud-config` that `tether-operator token create --user-data`
//! prints. `https://` seeds are refused: before enrollment the node trusts nothing but the
//! pin the seed itself carries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_boot::BootParams;
use tether_boot::seed::{MetaData, NoCloudSource, Seed};

use super::under;
use crate::error::{Error, Result};

/// Local seed directories, in cloud-init's order.
pub const SEED_DIRS: &[&str] = &[
    "/var/lib/cloud/seed/nocloud/",
    "/var/lib/cloud/seed/nocloud-net/",
];
/// Volume labels of a NoCloud seed disk.
pub const LABELS: &[&str] = &["cidata", "CIDATA"];
/// Largest `user-data` or `meta-data` read over HTTP.
pub const MAX_SEED_DOCUMENT: usize = 64 * 1024;
/// Where a seed volume is mounted while it is read.
pub const MOUNT_POINT: &str = "/run/tether/cidata";

/// A seed's two documents.
struct Documents {
    user_data: String,
    meta_data: String,
}

/// Finds and reads a NoCloud seed: `Ok(None)` when there is none at all.
pub async fn find(
    root: &Path,
    boot: &BootParams,
    allow_mounts: bool,
) -> Result<Option<(Seed, String)>> {
    let ds = match &boot.nocloud {
        Some(ds) => Some((ds.clone(), "kernel command line")),
        None => smbios_ds(root)?.map(|ds| (ds, "SMBIOS serial number")),
    };
    if let Some((ds, place)) = ds
        && let Some(uri) = &ds.seed
    {
        let origin = format!("NoCloud seed {uri} (from the {place})");
        let docs = fetch_seed(root, uri).await.map_err(|e| bad(&origin, e))?;
        return parse(&origin, &docs).map(|s| Some((s, origin)));
    }
    for dir in SEED_DIRS {
        let path = under(root, dir);
        if path.join("user-data").exists() {
            let origin = format!("NoCloud seed directory {dir}");
            let docs = read_dir(&path)?;
            return parse(&origin, &docs).map(|s| Some((s, origin)));
        }
    }
    if allow_mounts {
        for label in LABELS {
            let dev = under(root, &format!("/dev/disk/by-label/{label}"));
            if dev.exists() {
                let origin = format!("NoCloud volume {label} ({})", dev.display());
                let docs = read_volume(&dev, &under(root, MOUNT_POINT))?;
                return parse(&origin, &docs).map(|s| Some((s, origin)));
            }
        }
    }
    Ok(None)
}

fn bad(origin: &str, detail: impl ToString) -> Error {
    Error::BadInput {
        source_name: origin.to_string(),
        detail: detail.to_string(),
    }
}

fn parse(origin: &str, docs: &Documents) -> Result<Seed> {
    let meta = MetaData::parse(&docs.meta_data).map_err(|e| bad(origin, e))?;
    tracing::info!(instance_id = %meta.instance_id, "NoCloud seed found at {origin}");
    Seed::from_user_data(&docs.user_data).map_err(|e| bad(origin, e))
}

/// `ds=nocloud;…` in `/sys/class/dmi/id/product_serial` (QEMU: `-smbios type=1,serial=…`).
fn smbios_ds(root: &Path) -> Result<Option<NoCloudSource>> {
    let path = under(root, "/sys/class/dmi/id/product_serial");
    let Ok(serial) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let serial = serial.trim();
    let Some(value) = serial.strip_prefix("ds=") else {
        return Ok(None);
    };
    NoCloudSource::parse(value).map_err(|e| bad("SMBIOS serial number", e))
}

fn read_dir(dir: &Path) -> Result<Documents> {
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).map_err(Error::io("read NoCloud", &p))
    };
    Ok(Documents {
        user_data: read("user-data")?,
        meta_data: read("meta-data")?,
    })
}

async fn fetch_seed(root: &Path, uri: &str) -> std::result::Result<Documents, String> {
    if let Some(path) = uri.strip_prefix("file://") {
        return read_dir(&under(root, path)).map_err(|e| e.to_string());
    }
    if !uri.starts_with("http://") {
        return Err(format!(
            "only http:// and file:// seeds are read ({uri}); before enrolling, the node trusts nothing but the pin inside the seed"
        ));
    }
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(crate::tls::trusts_nothing().map_err(|e| e.to_string())?)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    let get = |f: &'static str| {
        let client = client.clone();
        let url = format!("{uri}{f}");
        async move {
            let r = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if !r.status().is_success() {
                return Err(format!("GET {url}: {}", r.status()));
            }
            // A seed is a few hundred bytes; an endless body must not fill the node's memory.
            let mut body = Vec::new();
            let mut r = r;
            while let Some(chunk) = r.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_SEED_DOCUMENT {
                    return Err(format!("GET {url}: more than {MAX_SEED_DOCUMENT} bytes"));
                }
            }
            String::from_utf8(body).map_err(|_| format!("GET {url}: not UTF-8"))
        }
    };
    Ok(Documents {
        user_data: get("user-data").await?,
        meta_data: get("meta-data").await?,
    })
}

/// Mounts `dev` read-only at `mount_point` (iso9660, then vfat), reads the seed, unmounts.
fn read_volume(dev: &Path, mount_point: &Path) -> Result<Documents> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    std::fs::create_dir_all(mount_point).map_err(Error::io("create", mount_point))?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut last = None;
    for fstype in ["iso9660", "vfat"] {
        match mount(Some(dev), mount_point, Some(fstype), flags, None::<&str>) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => last = Some(format!("{fstype}: {e}")),
        }
    }
    if let Some(e) = last {
        return Err(bad(
            &format!("NoCloud volume {}", dev.display()),
            format!("cannot mount it read-only as iso9660 or vfat ({e})"),
        ));
    }
    let docs = read_dir(mount_point);
    if let Err(e) = umount2(mount_point, MntFlags::MNT_DETACH) {
        tracing::warn!("unmount {}: {e}", mount_point.display());
    }
    docs
}

/// The seed documents in `dir` as a user would lay them out (for tests and tools).
pub fn seed_dir_files(seed: &Seed, instance_id: &str) -> Vec<(PathBuf, String)> {
    vec![
        (PathBuf::from("user-data"), seed.to_user_data()),
        (
            PathBuf::from("meta-data"),
            format!("instance-id: {instance_id}\n"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Seed {
        Seed::new(
            "https://10.0.0.1:9443",
            format!("sha256:{}", "ab".repeat(32)).parse().unwrap(),
            "abcdef.0123456789abcdef".parse().unwrap(),
        )
        .unwrap()
    }

    fn write_seed(dir: &Path, user_data: &str, meta: Option<&str>) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("user-data"), user_data).unwrap();
        if let Some(m) = meta {
            std::fs::write(dir.join("meta-data"), m).unwrap();
        }
    }

    #[tokio::test]
    async fn file_seed_from_the_smbios_serial() {
        let t = tempfile::tempdir().unwrap();
        let dmi = t.path().join("sys/class/dmi/id");
        std::fs::create_dir_all(&dmi).unwrap();
        std::fs::write(
            dmi.join("product_serial"),
            "ds=nocloud;s=file:///srv/seed/\n",
        )
        .unwrap();
        write_seed(
            &t.path().join("srv/seed"),
            &seed().to_user_data(),
            Some("instance-id: a\n"),
        );
        let (s, origin) = find(t.path(), &BootParams::default(), false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s, seed());
        assert!(origin.contains("SMBIOS"), "{origin}");
    }

    #[tokio::test]
    async fn seeds_that_are_not_ours_or_incomplete_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("var/lib/cloud/seed/nocloud");
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "#cloud-config\npackages: [htop]\n",
                Some("instance-id: a\n"),
                "writes no",
            ),
            (&seed().to_user_data(), None, "meta-data"),
            (
                &seed().to_user_data(),
                Some("local-hostname: x\n"),
                "instance-id",
            ),
            (
                "#!/bin/sh\necho hi\n",
                Some("instance-id: a\n"),
                "#cloud-config",
            ),
        ];
        for (ud, meta, want) in cases {
            let _ = std::fs::remove_dir_all(&dir);
            write_seed(&dir, ud, *meta);
            let err = find(t.path(), &BootParams::default(), false)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{ud:?}: {err}");
        }
        assert!(
            find(
                tempfile::tempdir().unwrap().path(),
                &BootParams::default(),
                false
            )
            .await
            .unwrap()
            .is_none()
        );
    }

    #[tokio::test]
    async fn https_seeds_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let boot = BootParams::parse("ds=nocloud;s=https://10.0.0.1/seed/").unwrap();
        let err = find(t.path(), &boot, false).await.unwrap_err().to_string();
        assert!(err.contains("only http:// and file://"), "{err}");
    }
}
