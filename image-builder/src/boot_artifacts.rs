//! Boot artifacts in the store: a built image (kernel, initramfs, rootfs, `disk.raw`, the
//! signed manifest) pushed as one OCI artifact `tether/boot/<BootImage name>:<version>`, after
//! its signature and every digest are verified. Each file is a raw layer, so its blob digest
//! is the sha256 the manifest and the `BootImage` already carry: whoever holds a `BootImage`
//! can fetch any of its artifacts from the store by that digest.
//!
//! The config is the image's `manifest.json` itself; `manifest.sig` is a layer beside the
//! artifacts, so a node or tether-pxe can check the signature of what it fetched.

use std::path::Path;

use serde_json::json;
use tether_boot::manifest::Manifest;
use tether_upstream::Pins;

use crate::boot::{object_name, role};
use crate::build::verify_image;
use crate::oci::{self, Layout};
use crate::{Error, Result};

/// What a boot image's OCI manifest says it is.
pub const ARTIFACT_TYPE: &str = "application/vnd.tether.boot.image.v1";
/// The config blob's media type: the image's signed `manifest.json`.
pub const CONFIG_TYPE: &str = "application/vnd.tether.boot.manifest.v1+json";

/// A boot image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `tether/boot/<name>:<version>`.
    pub reference: String,
    /// The OCI manifest's digest.
    pub manifest: String,
    /// Each pushed file and its blob digest (`sha256:…`), in the order pushed.
    pub files: Vec<(String, String)>,
}

/// Verifies the image in `dir` with `public` and pushes it to the store at `store`
/// (`host:port`, plain HTTP); `work` holds the OCI layout while pushing. A tampered image
/// is refused before anything is sent.
pub fn push(
    dir: &Path,
    public: &ed25519_dalek::VerifyingKey,
    store: &str,
    work: &Path,
) -> Result<PushedImage> {
    let m = verify_image(dir, public)?;
    let scratch = oci::scratch(work, "boot")?;
    let (manifest_digest, files) = write_layout(dir, &m, scratch.path())?;
    let reference = format!(
        "tether/boot/{}:{}",
        object_name(&m.version),
        oci::tag(&m.version)
    );
    oci::push(
        scratch.path(),
        &format!("{store}/{reference}"),
        &Pins::default(),
    )?;
    Ok(PushedImage {
        reference,
        manifest: manifest_digest,
        files,
    })
}

/// The layout of the verified image `m` in `dir`: the manifest as config, every artifact
/// with a role and `manifest.sig` as layers. Returns the manifest digest and the files.
fn write_layout(
    dir: &Path,
    m: &Manifest,
    layout_dir: &Path,
) -> Result<(String, Vec<(String, String)>)> {
    let layout = Layout::create(layout_dir)?;
    let config = layout.add_file(CONFIG_TYPE, &dir.join("manifest.json"))?;
    let mut layers = Vec::new();
    let mut files = Vec::new();
    for (file, want) in &m.artifacts {
        let Some(role) = role(file) else { continue };
        if file == "manifest.json" {
            continue;
        }
        let d = layout.add_file("application/octet-stream", &dir.join(file))?;
        if d.digest != format!("sha256:{}", want.sha256) {
            // verify_image checked it a moment ago: the file changed under us.
            return Err(Error::Verify(format!("{file} changed while being pushed")));
        }
        layers.push(d.to_json(json!({"annotations": {
            "org.opencontainers.image.title": file,
            "dev.tether.role": role,
        }})));
        files.push((file.clone(), d.digest));
    }
    let sig = layout.add_file(
        "application/vnd.tether.boot.signature.v1",
        &dir.join("manifest.sig"),
    )?;
    layers.push(sig.to_json(json!({"annotations": {
        "org.opencontainers.image.title": "manifest.sig",
    }})));
    files.push(("manifest.sig".into(), sig.digest));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config.to_json(json!({})),
        "layers": layers,
        "annotations": {"org.opencontainers.image.version": m.version},
    });
    let d = layout.finish(&manifest, json!({"artifactType": ARTIFACT_TYPE}))?;
    Ok((d.digest, files))
}
