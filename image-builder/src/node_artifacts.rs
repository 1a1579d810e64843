//! Node artifacts in the store: the pinned binaries a node installs — the kubelet,
//! containerd and its runc shim, runc, the CNI plugins — each pushed as an OCI artifact
//! (DESIGN.md "Artifacts and images without a registry"), so a node fetches one blob by
//! digest with a plain HTTP GET (`/v2/<repository>/blobs/sha256:…`) and checks it.
//!
//! Each artifact is one manifest: `artifactType` [`ARTIFACT_TYPE`], the empty config, one
//! layer — the binary itself, `application/octet-stream`, titled with its file name. It is
//! written as an OCI image layout and `crane push`ed to `tether/node/<name>:<version>`. The
//! manifest carries no timestamp: pushing the same binary twice gives the same digest.

use std::path::Path;

use serde_json::{Value, json};
use tether_upstream::{Cache, Component, Pins};

use crate::Result;
use crate::oci::{self, Descriptor, Layout};

/// What a node artifact's manifest says it is.
pub use tether_api::artifacts::NODE_ARTIFACT_TYPE as ARTIFACT_TYPE;

/// The binaries a node installs, in the order they are pushed.
pub use tether_upstream::NODE_COMPONENTS as COMPONENTS;

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
    tether_api::artifacts::node_repository(component.name())
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
    push_binary(component, &version, &binary, store, pins, work)
}

/// Pushes `binary` as `component` at `version` (what [`push`] does with the cached one; a
/// test pushes a binary of its own making).
pub fn push_binary(
    component: Component,
    version: &str,
    binary: &Path,
    store: &str,
    pins: &Pins,
    work: &Path,
) -> Result<NodeArtifact> {
    let scratch = oci::scratch(work, component.name())?;
    let (manifest, blob) = write_layout(scratch.path(), binary, component.name(), version)?;
    let reference = format!("{}:{}", repository(component), oci::tag(version));
    oci::push(scratch.path(), &format!("{store}/{reference}"), pins)?;
    Ok(NodeArtifact {
        component,
        reference,
        manifest: manifest.digest,
        blob: blob.digest,
        size: blob.size,
    })
}

/// The artifact manifest of a binary `name` at `version` described by `blob`, with the
/// empty config `config`.
pub fn manifest(name: &str, version: &str, blob: &Descriptor, config: &Descriptor) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": oci::MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config.to_json(json!({})),
        "layers": [blob.to_json(json!({
            "annotations": {"org.opencontainers.image.title": name},
        }))],
        "annotations": {"org.opencontainers.image.version": version},
    })
}

/// Writes an OCI image layout holding the artifact of `binary` into `dir` (replacing it);
/// returns the manifest's and the binary's descriptors.
fn write_layout(
    dir: &Path,
    binary: &Path,
    name: &str,
    version: &str,
) -> Result<(Descriptor, Descriptor)> {
    let layout = Layout::create(dir)?;
    let blob = layout.add_file("application/octet-stream", binary)?;
    let config = layout.add_bytes("application/vnd.oci.empty.v1+json", EMPTY_CONFIG)?;
    let m = layout.finish(
        &manifest(name, version, &blob, &config),
        json!({"artifactType": ARTIFACT_TYPE}),
    )?;
    Ok((m, blob))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::sha256_digest;

    fn desc(media_type: &str, data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: sha256_digest(data),
            size: data.len() as u64,
        }
    }

    #[test]
    fn manifest_is_an_artifact_of_one_binary_layer() {
        let blob = desc("application/octet-stream", b"binary");
        let config = desc("application/vnd.oci.empty.v1+json", EMPTY_CONFIG);
        let m = manifest("kubelet", "v1.36.3", &blob, &config);
        assert_eq!(m["artifactType"], ARTIFACT_TYPE);
        assert_eq!(
            m["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(m["layers"].as_array().unwrap().len(), 1);
        assert_eq!(m["layers"][0]["digest"], blob.digest.as_str());
        assert_eq!(m["layers"][0]["size"], 6);
        assert_eq!(
            m["layers"][0]["annotations"]["org.opencontainers.image.title"],
            "kubelet"
        );
        assert_eq!(
            m["annotations"]["org.opencontainers.image.version"],
            "v1.36.3"
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
    fn same_binary_same_digests() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("kubelet");
        std::fs::write(&bin, b"ELF pretend").unwrap();
        let dir = t.path().join("layout");
        let (m, b) = write_layout(&dir, &bin, "kubelet", "v1.36.3").unwrap();
        assert_eq!(b.digest, sha256_digest(b"ELF pretend"));
        assert_eq!(
            write_layout(&dir, &bin, "kubelet", "v1.36.3").unwrap(),
            (m.clone(), b)
        );
        let (other, _) = write_layout(&dir, &bin, "kubelet", "v1.36.4").unwrap();
        assert_ne!(other.digest, m.digest, "the version is in the manifest");
    }
}
