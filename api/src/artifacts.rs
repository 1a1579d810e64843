//! The artifact store: the OCI registry the management plane runs (DESIGN.md "Artifacts
//! and images without a registry"). Nodes mirror `registry.k8s.io` to it and download node
//! artifacts from it by digest; the operator (or xtask) pushes.

/// ConfigMap in [`crate::machine_api::NAMESPACE`] where the store's address is published.
pub const CONFIG_MAP: &str = "tether-registry";
/// Its key: `host:port` the node network reaches (plain HTTP; content is pulled by digest).
pub const KEY_ADDRESS: &str = "address";

/// The registry name Tether's own test images are named under (`test.tether.dev/shell:1`).
pub const TEST_REGISTRY: &str = "test.tether.dev";

/// Every registry name the store holds images under: nodes get a mirror for each, so
/// manifests keep their usual names.
pub const MIRRORED_REGISTRIES: &[&str] = &["registry.k8s.io", TEST_REGISTRY];

/// What a node artifact's manifest says it is.
pub const NODE_ARTIFACT_TYPE: &str = "application/vnd.tether.node.binary.v1";

/// The repository of node binary `name` (`kubelet`, `runc`, `bridge`, …) in the store.
pub fn node_repository(name: &str) -> String {
    format!("tether/node/{name}")
}

/// The manifest media type node artifacts are pushed with (an OCI image manifest).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry tag for `version`: OCI tags allow `[A-Za-z0-9_.-]` (first not `.`/`-`),
/// so anything else (a SemVer `+build`) becomes `_`.
pub fn tag(version: &str) -> String {
    let t: String = version
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match t.chars().next() {
        Some('.') | Some('-') | None => format!("_{t}"),
        _ => t,
    }
}

/// The URL of blob `digest` (`sha256:…`) of `repository` in the store at `store`.
pub fn blob_url(store: &str, repository: &str, digest: &str) -> String {
    format!("http://{store}/v2/{repository}/blobs/{digest}")
}

/// The URL of the manifest `reference` (a tag or digest) of `repository`.
pub fn manifest_url(store: &str, repository: &str, reference: &str) -> String {
    format!("http://{store}/v2/{repository}/manifests/{reference}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_urls() {
        assert_eq!(tag("v1.36.0"), "v1.36.0");
        assert_eq!(tag("1.2.3+build"), "1.2.3_build");
        assert_eq!(tag(".x"), "_.x");
        assert_eq!(node_repository("kubelet"), "tether/node/kubelet");
        assert_eq!(
            blob_url("10.0.0.1:5000", "tether/node/runc", "sha256:ab"),
            "http://10.0.0.1:5000/v2/tether/node/runc/blobs/sha256:ab"
        );
    }
}
