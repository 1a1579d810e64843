//! Where tether-pxe learns what each machine boots: the [`BootSource`] trait and its two
//! implementations, [`config::ConfigSource`] (a TOML file, for standalone sites) and
//! [`kube::KubeSource`] (the management cluster's `Machine` and `BootImage` objects).

pub mod config;
pub mod kube;

use futures::future::BoxFuture;
use tether_api::BootImageSpec;

use crate::artifacts::Store;
use crate::error::{Error, Result};
use crate::script::{ArtifactRef, BootPlan, Enrollment};
use tether_boot::Mac;

/// The machine a MAC belongs to and the image it should boot.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Name of the machine (the `Machine` object or the TOML entry).
    pub machine: String,
    /// True when this lookup recorded the MAC for the first time.
    pub discovered: bool,
    /// The image to boot.
    pub image: BootImageSpec,
}

/// Answers "what does this MAC boot?", recording MACs it has never seen (phase
/// `Discovered`) and giving them the default image. Implementations must be idempotent:
/// two servers on one segment may ask about the same MAC at the same moment.
pub trait BootSource: Send + Sync {
    /// Looks up (and on first sight records) `mac`.
    fn assignment(&self, mac: Mac) -> BoxFuture<'_, Result<Assignment>>;
}

/// Artifact roles loaded as initrds, in this order (the rootfs rides as a second initrd).
pub const INITRD_ROLES: &[&str] = &["initrd", "rootfs"];

/// Turns an assignment into a concrete boot plan: artifacts we hold are fetched from us
/// (`<http_base>/artifacts/sha256/<hex>`), others from the image's own URL.
pub fn plan(
    a: &Assignment,
    mac: Mac,
    store: &Store,
    http_base: &str,
    enroll: &Enrollment,
) -> Result<BootPlan> {
    let resolve = |role: &str| -> Result<Option<ArtifactRef>> {
        let Some(art) = a.image.artifacts.get(role) else {
            return Ok(None);
        };
        let url = if store.get(&art.sha256).is_some() {
            format!("{http_base}/artifacts/sha256/{}", art.sha256)
        } else {
            art.url.clone()
        };
        Ok(Some(ArtifactRef {
            sha256: art.sha256.clone(),
            url,
        }))
    };
    let kernel = resolve("kernel")?.ok_or_else(|| Error::NoPlan {
        mac: mac.to_string(),
        detail: format!("image {} has no kernel artifact", a.image.version),
    })?;
    let mut initrds = Vec::new();
    for role in INITRD_ROLES {
        if let Some(r) = resolve(role)? {
            initrds.push(r);
        }
    }
    Ok(BootPlan {
        machine: a.machine.clone(),
        image_version: a.image.version.clone(),
        kernel,
        initrds,
        cmdline: a.image.cmdline.clone(),
        enroll: enroll.clone(),
    })
}
