//! The node's own Node object, read with the kubelet's own client certificate (the Node
//! authorizer lets a node read its Node): whether it is Ready and which `podCIDR` the
//! tenant gave it. The agent needs no credential of its own in the tenant for this.

use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// What the agent reads of its Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// `spec.podCIDR`.
    pub pod_cidr: Option<String>,
    /// The `Ready` condition is True.
    pub ready: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Node {
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
}

#[derive(Default, Deserialize)]
struct Status {
    #[serde(default)]
    conditions: Vec<Cond>,
}

#[derive(Deserialize)]
struct Cond {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

/// The state in a Node's JSON.
pub fn parse(json: &[u8]) -> Result<NodeState> {
    let n: Node = serde_json::from_slice(json).map_err(|e| Error::BadInput {
        source_name: "the Node object".into(),
        detail: e.to_string(),
    })?;
    Ok(NodeState {
        pod_cidr: n.spec.pod_cidr.filter(|c| !c.is_empty()),
        ready: n
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
    })
}

/// Reads Node `name` from `api_server` (trusting `ca_pem`) as the holder of `client_pem`
/// (the kubelet's certificate and key in one PEM). `None` while the Node does not exist.
pub async fn read(
    api_server: &str,
    ca_pem: &str,
    client_pem: &str,
    name: &str,
) -> Result<Option<NodeState>> {
    let tls = crate::tls::mutual(ca_pem, client_pem, client_pem)?;
    let url = format!("{}/api/v1/nodes/{name}", api_server.trim_end_matches('/'));
    let unreachable = |detail: String| Error::Unreachable {
        url: url.clone(),
        detail,
    };
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| unreachable(e.to_string()))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !resp.status().is_success() {
        return Err(unreachable(format!("HTTP {}", resp.status())));
    }
    let body = resp.bytes().await.map_err(|e| unreachable(e.to_string()))?;
    parse(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_states() {
        let ready = br#"{"spec":{"podCIDR":"10.244.1.0/24"},"status":{"conditions":[{"type":"MemoryPressure","status":"False"},{"type":"Ready","status":"True"}]}}"#;
        assert_eq!(
            parse(ready).unwrap(),
            NodeState {
                pod_cidr: Some("10.244.1.0/24".into()),
                ready: true
            }
        );
        let fresh = br#"{"metadata":{"name":"m1"},"spec":{}}"#;
        assert_eq!(parse(fresh).unwrap(), NodeState::default());
        let not_ready = br#"{"spec":{"podCIDR":""},"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#;
        assert_eq!(parse(not_ready).unwrap(), NodeState::default());
        assert!(parse(b"<html>").is_err());
    }
}
