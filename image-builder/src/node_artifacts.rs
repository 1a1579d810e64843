//! Node artifacts in the store: the pinned binaries a node installs — the kubelet,
//! containerd and its runc shim, runc, the CNI plugins — each pushed as an OCI artifact
//! (DESIGN.md "Artifacts and images without a registry"), so a node fetches one blob by
//! digest with a plain HTTP GET (`/v2/<repository>/blobs/sha256:…`) and checks it.
//!
//! Each artifact is one manifest: `artifactType` [`ARTIFACT_TYPE`], the empty config, one
//! layer — the binary itself, `application/octet-stream`, titled with its file name. It is
//! written as an OCI image layout and `crane push`ed to `tether/node/<name>:<version>`. The
//! manifest carries no timestamp: pushing the same binary twice gives the same digest.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};
use tether_upstream::{Cache, Component, Pins};

use crate::build::run;
use crate::{Error, Result};

/// What a node artifact's manifest says it is.
pub const ARTIFACT_TYPE: &str = "application/vnd.tether.node.binary.v1";

/// The binaries a node installs, in the order they are pushed.
pub const COMPONENTS: &[Component] = &[
    Component::Kubelet,
    Component::Containerd,
    Component::ContainerdShimRuncV2,
    Component::Runc,
    Component::CniBridge,
    Component::CniHostLocal,
    Component::CniLoopback,
    Component::CniPortmap,
];

/// The OCI empty descriptor's content (`{}`), the config of every artifact.
const EMPTY_CONFIG: &[u8] = b"{}";

/// A node artifact in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeArtifact {
    /// The binary.
    pub component: Component,
    /// `tether/node/<name>:<version>`.
    pub reference: String,
    /// The manifest's digest (`sha256:…`).
    pub manifest: String,
    /// The binary's digest (`sha256:…`): what a node fetches and checks.
    pub blob: String,
    /// The binary's size in bytes.
    pub size: u64,
}

impl NodeArtifact {
    /// The URL path a node GETs the binary from (after `http://<store>`).
    pub fn blob_path(&self) -> String {
        let repository = self.reference.split(':').next().unwrap_or_default();
        format!("/v2/{repository}/blobs/{}", self.blob)
    }
}

/// The repository of `component` in the store.
pub fn repository(component: Component) -> String {
    format!("tether/node/{}", component.name())
}

/// Pushes every node binary of `pins` to the store at `store` (`host:port`, plain HTTP);
/// `work` holds the OCI layouts while pushing.
pub fn push_all(store: &str, pins: &Pins, work: &Path) -> Result<Vec<NodeArtifact>> {
    COMPONENTS
        .iter()
        .map(|c| push(*c, store, pins, work))
        .collect()
}

/// Pushes one node binary.
pub fn push(component: Component, store: &str, pins: &Pins, work: &Path) -> Result<NodeArtifact> {
    let version = pins.version_for(component, pins.kubernetes)?;
    let binary = Cache::from_env().lookup(component, &version)?;
    let dir = work.join("node-artifacts").join(component.name());
    let (manifest, blob, size) = write_layout(&dir, &binary, component.name(), &version)?;
    let reference = format!("{}:{version}", repository(component));
    let crane = Cache::from_env().lookup(
        Component::Crane,
        &pins.version_for(Component::Crane, pins.kubernetes)?,
    )?;
    run(Command::new(crane)
        .args(["push", "--insecure"])
        .arg(&dir)
        .arg(format!("{store}/{reference}")))?;
    Ok(NodeArtifact {
        component,
        reference,
        manifest,
        blob,
        size,
    })
}

/// The artifact manifest of a binary `name` at `version` with digest `blob` and `size`.
pub fn manifest(name: &str, version: &str, blob: &str, size: u64) -> Vec<u8> {
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": sha256_digest(EMPTY_CONFIG),
            "size": EMPTY_CONFIG.len(),
        },
        "layers": [{
            "mediaType": "application/octet-stream",
            "digest": blob,
            "size": size,
            "annotations": {"org.opencontainers.image.title": name},
        }],
        "annotations": {"org.opencontainers.image.version": version},
    });
    serde_json::to_vec(&m).expect("serialise")
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes an OCI image layout holding the artifact of `binary` into `dir` (replacing it);
/// returns the manifest digest, the binary's digest and size.
fn write_layout(
    dir: &Path,
    binary: &Path,
    name: &str,
    version: &str,
) -> Result<(String, String, u64)> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(Error::io("remove", dir))?;
    }
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(Error::io("create", &blobs))?;
    let data = fs::read(binary).map_err(Error::io("read", binary))?;
    let blob = sha256_digest(&data);
    let size = data.len() as u64;
    drop(data);
    let blob_file = blob_path(&blobs, &blob);
    if fs::hard_link(binary, &blob_file).is_err() {
        fs::copy(binary, &blob_file).map_err(Error::io("copy", binary))?;
    }
    write(
        &blob_path(&blobs, &sha256_digest(EMPTY_CONFIG)),
        EMPTY_CONFIG,
    )?;
    let manifest = manifest(name, version, &blob, size);
    let manifest_digest = sha256_digest(&manifest);
    write(&blob_path(&blobs, &manifest_digest), &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": ARTIFACT_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
        }],
    });
    write(
        &dir.join("index.json"),
        &serde_json::to_vec(&index).expect("serialise"),
    )?;
    write(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok((manifest_digest, blob, size))
}

fn blob_path(blobs: &Path, digest: &str) -> PathBuf {
    blobs.join(digest.trim_start_matches("sha256:"))
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    fs::write(path, data).map_err(Error::io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_is_an_artifact_of_one_binary_layer() {
        let blob = sha256_digest(b"binary");
        let m: serde_json::Value =
            serde_json::from_slice(&manifest("kubelet", "v1.36.3", &blob, 6)).unwrap();
        assert_eq!(m["artifactType"], ARTIFACT_TYPE);
        assert_eq!(
            m["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        // The well-known digest of `{}` (OCI image-spec, "Guidance for an Empty Descriptor").
        assert_eq!(
            m["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(m["layers"].as_array().unwrap().len(), 1);
        assert_eq!(m["layers"][0]["digest"], blob.as_str());
        assert_eq!(m["layers"][0]["size"], 6);
        assert_eq!(
            m["layers"][0]["annotations"]["org.opencontainers.image.title"],
            "kubelet"
        );
    }

    #[test]
    fn same_binary_same_manifest() {
        let blob = sha256_digest(b"x");
        assert_eq!(
            manifest("runc", "v1.5.3", &blob, 1),
            manifest("runc", "v1.5.3", &blob, 1)
        );
        assert_ne!(
            manifest("runc", "v1.5.3", &blob, 1),
            manifest("runc", "v1.5.4", &blob, 1)
        );
    }

    #[test]
    fn blob_path_names_the_repository() {
        let a = NodeArtifact {
            component: Component::Runc,
            reference: "tether/node/runc:v1.5.3".into(),
            manifest: "sha256:m".into(),
            blob: "sha256:b".into(),
            size: 1,
        };
        assert_eq!(a.blob_path(), "/v2/tether/node/runc/blobs/sha256:b");
    }

    #[test]
    fn layout_holds_index_manifest_config_and_blob() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("kubelet");
        fs::write(&bin, b"ELF pretend").unwrap();
        let dir = t.path().join("layout");
        let (m, b, size) = write_layout(&dir, &bin, "kubelet", "v1.36.3").unwrap();
        assert_eq!(size, 11);
        assert_eq!(b, sha256_digest(b"ELF pretend"));
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], m.as_str());
        for d in [&m, &b, &sha256_digest(EMPTY_CONFIG)] {
            let f = blob_path(&dir.join("blobs/sha256"), d);
            assert_eq!(sha256_digest(&fs::read(&f).unwrap()), *d, "{}", f.display());
        }
        // Writing again replaces, and gives the same digests.
        assert_eq!(
            write_layout(&dir, &bin, "kubelet", "v1.36.3").unwrap(),
            (m, b, size)
        );
    }
}
