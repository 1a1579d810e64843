//! The standalone [`BootSource`]: a TOML file naming images (by local file paths, hashed at
//! start-up into the artifact store) and, optionally, which MAC boots which image.
//!
//! ```toml
//! default_image = "discovery"
//!
//! [images.discovery]
//! version = "2026.11.1"
//! cmdline = "console=ttyS0"
//! kernel = "/srv/tether/vmlinuz"
//! initrd = "/srv/tether/initrd.img"
//! rootfs = "/srv/tether/rootfs.erofs"   # optional, loaded as a second initrd
//!
//! [machines."52:54:00:12:34:56"]
//! name = "rack1-node3"
//! image = "discovery"
//! ```
//!
//! Unknown MACs that DHCP'd on our segment get the default image and are recorded in memory
//! (at most [`MAX_DISCOVERED`]) and in the log: without a cluster there is nowhere durable
//! to put them, and the TOML file is the operator's, never rewritten by us. Unknown MACs
//! that did not are refused ([`Error::NotSeen`]). Every machine gets the same enrollment
//! values (`--api-url`, `--ca-pin`, `--token-file`): the token is a site-wide secret.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use tether_api::{Artifact, BootImageSpec};

use super::{Assignment, BootSource};
use crate::artifacts::Store;
use crate::error::{Error, Result};
use crate::script::Enrollment;
use tether_boot::Mac;

/// Unknown MACs remembered; past it they are still served, just not listed.
pub const MAX_DISCOVERED: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default_image: String,
    images: BTreeMap<String, ImageEntry>,
    #[serde(default)]
    machines: BTreeMap<String, MachineEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageEntry {
    version: String,
    #[serde(default)]
    cmdline: String,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    rootfs: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineEntry {
    name: Option<String>,
    image: Option<String>,
}

/// A [`BootSource`] read from a TOML file once, at start-up.
#[derive(Debug)]
pub struct ConfigSource {
    default_image: String,
    images: BTreeMap<String, BootImageSpec>,
    machines: BTreeMap<Mac, (String, String)>,
    discovered: Mutex<BTreeSet<Mac>>,
    enroll: Enrollment,
}

impl ConfigSource {
    /// Parses `path`, hashing every image file into `store`. Every reference is checked:
    /// a missing file, an unknown image or a bad MAC is a start-up error.
    /// `enroll` goes on every machine's command line.
    pub fn load(path: &Path, store: &mut Store, enroll: Enrollment) -> Result<ConfigSource> {
        let text = std::fs::read_to_string(path).map_err(Error::io("read", path.display()))?;
        Self::parse(&text, path, store, enroll)
    }

    /// Parses TOML text (`path` is for messages and relative file paths).
    pub fn parse(
        text: &str,
        path: &Path,
        store: &mut Store,
        enroll: Enrollment,
    ) -> Result<ConfigSource> {
        let bad = |detail: String| Error::Config {
            path: path.to_path_buf(),
            detail,
        };
        let file: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut images = BTreeMap::new();
        for (name, img) in &file.images {
            let mut artifacts = BTreeMap::new();
            for (role, p) in [
                ("kernel", Some(&img.kernel)),
                ("initrd", img.initrd.as_ref()),
                ("rootfs", img.rootfs.as_ref()),
            ] {
                let Some(p) = p else { continue };
                let full = base.join(p);
                let sha256 = store
                    .add_file(&full)
                    .map_err(|e| bad(format!("image {name} {role}: {e}")))?;
                let size = store.get(&sha256).map(|s| s.size).unwrap_or(0);
                artifacts.insert(
                    role.to_string(),
                    Artifact {
                        url: String::new(),
                        sha256,
                        size,
                    },
                );
            }
            images.insert(
                name.clone(),
                BootImageSpec {
                    version: img.version.clone(),
                    artifacts,
                    cmdline: img.cmdline.clone(),
                    manifest_signature: None,
                },
            );
        }
        if !images.contains_key(&file.default_image) {
            return Err(bad(format!(
                "default_image {:?} is not among [images]",
                file.default_image
            )));
        }
        let mut machines = BTreeMap::new();
        for (mac, m) in &file.machines {
            let parsed: Mac = mac.parse().map_err(|e| bad(format!("[machines]: {e}")))?;
            let image = m
                .image
                .clone()
                .unwrap_or_else(|| file.default_image.clone());
            if !images.contains_key(&image) {
                return Err(bad(format!("machine {mac}: unknown image {image:?}")));
            }
            let name = m.name.clone().unwrap_or_else(|| parsed.machine_name());
            machines.insert(parsed, (name, image));
        }
        Ok(ConfigSource {
            default_image: file.default_image,
            images,
            machines,
            discovered: Mutex::new(BTreeSet::new()),
            enroll,
        })
    }

    /// MACs seen that the file does not list.
    pub fn discovered(&self) -> Vec<Mac> {
        self.discovered
            .lock()
            .expect("discovered set poisoned")
            .iter()
            .copied()
            .collect()
    }
}

impl BootSource for ConfigSource {
    fn assignment(&self, mac: Mac, seen: bool) -> BoxFuture<'_, Result<Assignment>> {
        let result = match self.machines.get(&mac) {
            Some((name, image)) => Ok(Assignment {
                machine: name.clone(),
                discovered: false,
                image: self.images[image].clone(),
                enroll: self.enroll.clone(),
                minted: false,
            }),
            None if !seen => Err(Error::NotSeen {
                mac: mac.to_string(),
            }),
            None => {
                let first = {
                    let mut d = self.discovered.lock().expect("discovered set poisoned");
                    d.len() < MAX_DISCOVERED && d.insert(mac)
                };
                if first {
                    tracing::info!(%mac, "discovered unknown machine; serving the default image");
                }
                Ok(Assignment {
                    machine: mac.machine_name(),
                    discovered: first,
                    image: self.images[&self.default_image].clone(),
                    enroll: self.enroll.clone(),
                    minted: false,
                })
            }
        };
        async move { result }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_assigns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"kernel").unwrap();
        std::fs::write(dir.path().join("i"), b"initrd").unwrap();
        let toml = r#"
            default_image = "disc"
            [images.disc]
            version = "1"
            kernel = "k"
            initrd = "i"
            [images.prod]
            version = "2"
            cmdline = "quiet"
            kernel = "k"
            [machines."52:54:00:00:00:01"]
            name = "n1"
            image = "prod"
        "#;
        let mut store = Store::default();
        let src = ConfigSource::parse(
            toml,
            &dir.path().join("pxe.toml"),
            &mut store,
            Enrollment::default(),
        )
        .unwrap();
        assert_eq!(store.len(), 2);
        let known: Mac = "52:54:00:00:00:01".parse().unwrap();
        let unknown: Mac = "52:54:00:00:00:02".parse().unwrap();
        let get = |mac, seen| futures::executor::block_on(src.assignment(mac, seen));
        let a = get(known, false).unwrap();
        assert_eq!(
            (a.machine.as_str(), a.image.version.as_str(), a.discovered),
            ("n1", "2", false),
            "known machines are served whether seen or not"
        );
        let err = get(unknown, false).unwrap_err();
        assert!(matches!(err, Error::NotSeen { .. }), "{err}");
        assert!(src.discovered().is_empty(), "nothing recorded for it");
        let a = get(unknown, true).unwrap();
        assert_eq!(
            (a.machine.as_str(), a.image.version.as_str(), a.discovered),
            ("mac-525400000002", "1", true)
        );
        let a = get(unknown, true).unwrap();
        assert!(!a.discovered, "recorded once");
        assert_eq!(src.discovered(), vec![unknown]);
        // The discovered set is bounded.
        for i in 0..(MAX_DISCOVERED as u32 + 10) {
            let m = Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            assert!(get(m, true).is_ok());
        }
        assert_eq!(src.discovered().len(), MAX_DISCOVERED);
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"kernel").unwrap();
        let p = dir.path().join("pxe.toml");
        for (name, toml) in [
            ("syntax", "default_image = "),
            (
                "no default",
                "default_image = \"x\"\n[images.y]\nversion=\"1\"\nkernel=\"k\"",
            ),
            (
                "missing file",
                "default_image = \"y\"\n[images.y]\nversion=\"1\"\nkernel=\"nope\"",
            ),
            (
                "unknown key",
                "default_image = \"y\"\nfoo=1\n[images.y]\nversion=\"1\"\nkernel=\"k\"",
            ),
            (
                "bad mac",
                "default_image = \"y\"\n[images.y]\nversion=\"1\"\nkernel=\"k\"\n[machines.\"zz\"]\n",
            ),
            (
                "unknown image",
                "default_image = \"y\"\n[images.y]\nversion=\"1\"\nkernel=\"k\"\n[machines.\"52:54:00:00:00:01\"]\nimage=\"q\"\n",
            ),
        ] {
            let err = ConfigSource::parse(toml, &p, &mut Store::default(), Enrollment::default())
                .expect_err(name);
            assert!(matches!(err, Error::Config { .. }), "{name}: {err}");
        }
    }
}
