//! The node artifacts a pool's machines install, resolved in the artifact store: for each
//! binary of [`tether_upstream::NODE_COMPONENTS`] at the version the pool runs, the manifest
//! `tether/node/<name>:<version>` names one layer, whose digest and size go into the desired
//! config — so the operator needs no local copy of any binary, and a node checks exactly
//! the bytes the store holds.
//!
//! Resolutions are kept for the life of the process: an artifact is pushed from pinned,
//! reproducible builds, so a tag names the same bytes on every push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde::Deserialize;
use tether_api::artifacts::{
    self, CONFIG_MAP, KEY_ADDRESS, MANIFEST_MEDIA_TYPE, NODE_ARTIFACT_TYPE,
};
use tether_api::machine_api::{ArtifactKind, NodeArtifact};
use tether_upstream::{Component, Module, NODE_COMPONENTS, Pins};

use crate::error::Error;

/// How long one manifest request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The subset of an OCI manifest read here.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    artifact_type: Option<String>,
    layers: Vec<Layer>,
}

#[derive(Debug, Deserialize)]
struct Layer {
    digest: String,
    size: u64,
}

/// The one layer of a node artifact's manifest: `(sha256 hex, size)`.
pub fn layer_of(manifest: &[u8]) -> Result<(String, u64), String> {
    let m: Manifest =
        serde_json::from_slice(manifest).map_err(|e| format!("not an OCI manifest: {e}"))?;
    if m.artifact_type.as_deref() != Some(NODE_ARTIFACT_TYPE) {
        return Err(format!(
            "artifactType {:?} is not {NODE_ARTIFACT_TYPE}",
            m.artifact_type
        ));
    }
    let [layer] = m.layers.as_slice() else {
        return Err(format!("{} layers, not one", m.layers.len()));
    };
    let hex = layer
        .digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("layer digest {:?} is not sha256", layer.digest))?;
    Ok((hex.to_ascii_lowercase(), layer.size))
}

/// Where a component goes on the node.
pub fn kind_of(c: Component) -> ArtifactKind {
    match c.module() {
        Module::CniPlugins => ArtifactKind::CniPlugin,
        _ => ArtifactKind::Binary,
    }
}

/// Resolves node artifacts in the store.
#[derive(Clone)]
pub struct Store {
    http: reqwest::Client,
    resolved: Arc<Mutex<HashMap<String, (String, u64)>>>,
}

impl Store {
    /// A resolver (plain HTTP, as nodes reach the store).
    pub fn new() -> Result<Store, Error> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS for the store client: {e}")))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Invalid(format!("the store client: {e}")))?;
        Ok(Store {
            http,
            resolved: Arc::default(),
        })
    }

    /// The store's address (`host:port`) as published in `namespace`.
    pub async fn address(client: &kube::Client, namespace: &str) -> Result<String, Error> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        api.get_opt(CONFIG_MAP)
            .await
            .map_err(Error::kube(format!("get ConfigMap {CONFIG_MAP}")))?
            .and_then(|cm| cm.data?.get(KEY_ADDRESS).cloned())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no artifact store is published (ConfigMap {namespace}/{CONFIG_MAP}, key {KEY_ADDRESS})"
                ))
            })
    }

    /// Every node artifact for kubelet version `kubernetes`, from the store at `store`.
    pub async fn node_artifacts(
        &self,
        store: &str,
        kubernetes: &str,
    ) -> Result<Vec<NodeArtifact>, Error> {
        let pins = Pins::default();
        let mut out = Vec::with_capacity(NODE_COMPONENTS.len());
        for c in NODE_COMPONENTS {
            let version = pins
                .version_for(*c, kubernetes)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let repository = artifacts::node_repository(c.name());
            let url = artifacts::manifest_url(store, &repository, &artifacts::tag(&version));
            let (sha256, size) = self.layer(&url).await?;
            out.push(NodeArtifact {
                name: c.name().to_string(),
                kind: kind_of(*c),
                version,
                url: artifacts::blob_url(store, &repository, &format!("sha256:{sha256}")),
                sha256,
                size,
            });
        }
        Ok(out)
    }

    async fn layer(&self, url: &str) -> Result<(String, u64), Error> {
        if let Some(hit) = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
        {
            return Ok(hit.clone());
        }
        let fail = |why: String| Error::Invalid(format!("node artifact {url}: {why}"));
        let resp = self
            .http
            .get(url)
            .header("Accept", MANIFEST_MEDIA_TYPE)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!(
                "the store answered {} (is it pushed? `tether-image node-artifacts --push`)",
                resp.status()
            )));
        }
        let body = resp.bytes().await.map_err(|e| fail(e.to_string()))?;
        let got = layer_of(&body).map_err(fail)?;
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string(), got.clone());
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_must_be_one_layer_node_artifacts() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let good = serde_json::json!({
            "schemaVersion": 2, "artifactType": NODE_ARTIFACT_TYPE,
            "layers": [{"digest": digest, "size": 42, "mediaType": "application/octet-stream"}],
        });
        assert_eq!(
            layer_of(good.to_string().as_bytes()).unwrap(),
            ("ab".repeat(32), 42)
        );
        let mut two = good.clone();
        two["layers"] = serde_json::json!([good["layers"][0], good["layers"][0]]);
        let mut other_type = good.clone();
        other_type["artifactType"] = "application/vnd.oci.image.config.v1+json".into();
        let mut bad_digest = good.clone();
        bad_digest["layers"][0]["digest"] = "md5:00".into();
        for bad in [two, other_type, bad_digest] {
            assert!(layer_of(bad.to_string().as_bytes()).is_err(), "{bad}");
        }
        assert!(layer_of(b"<html>").is_err());
    }

    #[test]
    fn cni_plugins_go_to_the_cni_directory() {
        assert_eq!(kind_of(Component::CniBridge), ArtifactKind::CniPlugin);
        assert_eq!(kind_of(Component::Kubelet), ArtifactKind::Binary);
    }
}
