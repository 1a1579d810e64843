//! Where tether-pxe learns what each machine boots: the [`BootSource`] trait and its two
//! implementations, [`config::ConfigSource`] (a TOML file, for standalone sites) and
//! [`kube::KubeSource`] (the management cluster's `Machine` and `BootImage` objects).

pub mod config;
pub mod kube;

use futures::FutureExt;
use futures::future::BoxFuture;
use tether_api::BootImageSpec;
use tether_boot::cmdline::{BootParams, Root};

use crate::artifacts::Store;
use crate::error::{Error, Result};
use crate::script::{ArtifactRef, BootPlan, CPIO_SUFFIX, Enrollment, RootfsRef};
use tether_boot::Mac;

/// The machine a MAC belongs to, the image it should boot and what it enrolls with.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Name of the machine (the `Machine` object or the TOML entry).
    pub machine: String,
    /// True when this lookup recorded the MAC for the first time.
    pub discovered: bool,
    /// The image to boot.
    pub image: BootImageSpec,
    /// What goes on the command line for enrollment.
    pub enroll: Enrollment,
    /// `enroll.token` was minted for this one script: [`BootSource::commit`] records it
    /// before the script is served.
    pub minted: bool,
}

/// Answers "what does this MAC boot?". `seen` says whether the MAC DHCP'd on our segment
/// recently: only then may a source create anything (a `Discovered` Machine, a boot token).
/// A MAC it does not know and may not record is [`Error::NotSeen`]. Implementations must be
/// idempotent: two servers on one segment may ask about the same MAC at the same moment.
pub trait BootSource: Send + Sync {
    /// Looks up (and, when `seen`, on first sight records) `mac`.
    fn assignment(&self, mac: Mac, seen: bool) -> BoxFuture<'_, Result<Assignment>>;

    /// Stores what `a` minted (a boot token's record), once its script rendered; the
    /// script is served only after this succeeds.
    fn commit<'a>(&'a self, mac: Mac, a: &'a Assignment) -> BoxFuture<'a, Result<()>> {
        let _ = (mac, a);
        async { Ok(()) }.boxed()
    }
}

/// The artifact role loaded as the initramfs.
pub const INITRD_ROLE: &str = "initrd";
/// The artifact role holding the rootfs, loaded as a second initrd when the image boots
/// from `tether.root=file:PATH`.
pub const ROOTFS_ROLE: &str = "rootfs";

/// Turns an assignment into a concrete boot plan. Artifacts we hold are fetched from us
/// (`<http_base>/artifacts/sha256/<hex>`), others from the image's own URL. The image's
/// command line is parsed with [`BootParams`]; the per-machine words are ours to set, so an
/// image that sets `tether.mac`, `tether.token` or `initrd=` itself is refused.
pub fn plan(a: &Assignment, mac: Mac, store: &Store, http_base: &str) -> Result<BootPlan> {
    let no_plan = |detail: String| Error::NoPlan {
        mac: mac.to_string(),
        detail,
    };
    let held = |sha: &str| store.get(sha).is_some();
    let resolve = |role: &str| -> Option<ArtifactRef> {
        let art = a.image.artifacts.get(role)?;
        let url = if held(&art.sha256) {
            format!("{http_base}/artifacts/sha256/{}", art.sha256)
        } else {
            art.url.clone()
        };
        Some(ArtifactRef {
            sha256: art.sha256.clone(),
            url,
        })
    };
    let kernel = resolve("kernel")
        .ok_or_else(|| no_plan(format!("image {} has no kernel artifact", a.image.version)))?;
    let line = &a.image.cmdline;
    if line.chars().any(|c| c.is_whitespace() && c != ' ') {
        return Err(Error::Unsafe {
            what: "image kernel command line",
            value: line.chars().take(256).collect(),
            why: "contains a line break or a tab",
        });
    }
    let mut params = BootParams::parse(line)?;
    let ours = |w: &String| w.starts_with("initrd=");
    if params.mac.is_some() || params.token.is_some() || params.other.iter().any(ours) {
        return Err(no_plan(format!(
            "image {} sets tether.mac, tether.token or initrd= on its command line; tether-pxe sets those per machine",
            a.image.version
        )));
    }
    let rootfs = match &params.root {
        Some(Root::File(path)) => {
            let artifact = resolve(ROOTFS_ROLE).ok_or_else(|| {
                no_plan(format!(
                    "image {} boots from tether.root=file:{path} but has no rootfs artifact",
                    a.image.version
                ))
            })?;
            let wrapped_url = held(&artifact.sha256).then(|| {
                format!(
                    "{http_base}/artifacts/sha256/{}{CPIO_SUFFIX}{path}",
                    artifact.sha256
                )
            });
            Some(RootfsRef {
                artifact,
                path: path.clone(),
                wrapped_url,
            })
        }
        // A rootfs on a partition (or none): nothing to carry in memory.
        _ => None,
    };
    params.mac = Some(mac);
    let e = &a.enroll;
    if e.api_url.is_some() {
        params.api = e.api_url.clone();
    }
    if e.ca_pin.is_some() {
        params.ca = e.ca_pin;
    }
    params.token = e.token.clone();
    Ok(BootPlan {
        machine: a.machine.clone(),
        image_version: a.image.version.clone(),
        kernel,
        initrd: resolve(INITRD_ROLE),
        rootfs,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tether_api::Artifact;

    const MAC: Mac = Mac([0x52, 0x54, 0, 1, 2, 3]);
    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn assignment(cmdline: &str, roles: &[&str]) -> Assignment {
        let artifacts = roles
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    r.to_string(),
                    Artifact {
                        url: format!("http://img.example/{r}"),
                        sha256: format!("{i}").repeat(64),
                        size: 1,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        Assignment {
            machine: "m".into(),
            discovered: false,
            image: BootImageSpec {
                version: "1".into(),
                artifacts,
                cmdline: cmdline.into(),
                manifest_signature: None,
            },
            enroll: Enrollment {
                api_url: Some("https://api.example:9443".into()),
                ca_pin: Some(format!("sha256:{HASH}").parse().unwrap()),
                token: Some("abcdef.0123456789abcdef".parse().unwrap()),
            },
            minted: false,
        }
    }

    fn pxe_line() -> String {
        format!(
            "console=ttyS0 tether.root=file:/rootfs.img tether.rootfstype=squashfs \
             tether.verity.roothash={HASH} tether.verity.hashoffset=8192"
        )
    }

    #[test]
    fn the_rootfs_path_comes_from_the_image_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rootfs");
        std::fs::write(&f, b"squash").unwrap();
        let mut store = Store::default();
        let held = store.add_file(&f).unwrap();
        let mut a = assignment(&pxe_line(), &["kernel", "initrd", "rootfs"]);
        // Not held: fetched from the image's URL, no wrapped copy.
        let p = plan(&a, MAC, &store, "http://10.0.0.1").unwrap();
        let r = p.rootfs.clone().unwrap();
        assert_eq!(r.path, "/rootfs.img");
        assert_eq!(r.artifact.url, "http://img.example/rootfs");
        assert_eq!(r.wrapped_url, None);
        assert_eq!(p.params.mac, Some(MAC));
        assert_eq!(p.params.api.as_deref(), Some("https://api.example:9443"));
        assert!(p.params.token.is_some());
        // Held: ours, plain and wrapped.
        a.image.artifacts.get_mut("rootfs").unwrap().sha256 = held.clone();
        let p = plan(&a, MAC, &store, "http://10.0.0.1").unwrap();
        let r = p.rootfs.unwrap();
        assert_eq!(
            r.artifact.url,
            format!("http://10.0.0.1/artifacts/sha256/{held}")
        );
        assert_eq!(
            r.wrapped_url.unwrap(),
            format!("http://10.0.0.1/artifacts/sha256/{held}/cpio/rootfs.img")
        );
    }

    #[test]
    fn images_without_a_file_root_load_no_rootfs() {
        let a = assignment("console=ttyS0", &["kernel", "initrd", "rootfs"]);
        let p = plan(&a, MAC, &Store::default(), "http://10.0.0.1").unwrap();
        assert!(p.rootfs.is_none() && p.initrd.is_some());
        let a = assignment(
            &pxe_line().replace("file:/rootfs.img", "PARTLABEL=tether-a"),
            &["kernel", "rootfs"],
        );
        let p = plan(&a, MAC, &Store::default(), "http://10.0.0.1").unwrap();
        assert!(p.rootfs.is_none() && p.initrd.is_none());
    }

    #[test]
    fn the_image_api_and_pin_stay_unless_we_set_ours() {
        let line = format!("console=ttyS0 tether.api=https://baked:1 tether.ca=sha256:{HASH}");
        let mut a = assignment(&line, &["kernel"]);
        a.enroll = Enrollment::default();
        let p = plan(&a, MAC, &Store::default(), "http://10.0.0.1").unwrap();
        assert_eq!(p.params.api.as_deref(), Some("https://baked:1"));
        assert!(p.params.ca.is_some() && p.params.token.is_none());
    }

    #[test]
    fn bad_images_are_refused() {
        let cases: &[(&str, &[&str], &str)] = &[
            ("console=ttyS0", &["initrd"], "no kernel artifact"),
            (&pxe_line(), &["kernel", "initrd"], "no rootfs artifact"),
            (
                "tether.token=abcdef.0123456789abcdef",
                &["kernel"],
                "sets tether.mac",
            ),
            (
                "tether.mac=52:54:00:00:00:01",
                &["kernel"],
                "sets tether.mac",
            ),
            ("initrd=foo", &["kernel"], "initrd="),
            ("a=1\nshell", &["kernel"], "line break"),
            ("tether.root=file:/../etc", &["kernel"], "path or label"),
            ("tether.slot=a tether.slot=b", &["kernel"], "twice"),
        ];
        for (line, roles, want) in cases {
            let err = plan(
                &assignment(line, roles),
                MAC,
                &Store::default(),
                "http://10.0.0.1",
            )
            .expect_err(line)
            .to_string();
            assert!(err.contains(want), "{line:?}: {err} lacks {want:?}");
        }
    }
}
