//! What a fresh tenant cluster needs before nodes can join — the objects `kubeadm init`
//! would create — rendered as plain manifests ([`objects`], pure), applied into the tenant by
//! the pipeline's bootstrap step.
//!
//! - `cluster-info` in `kube-public` (endpoint + CA; the controller-manager's
//!   bootstrapsigner adds a JWS signature per bootstrap token) readable anonymously;
//! - bootstrap-token RBAC: `system:bootstrappers` may create CSRs, and nodes' renewal CSRs
//!   are auto-approved by the controller-manager (`selfnodeclient`). The first client CSR of
//!   a node is **not** (no `nodeclient` binding): the operator approves it per Machine
//!   (`machines::csr`), with the per-Machine token it minted (`machines::bootstrap_tokens`);
//! - konnectivity: the server may review agent tokens; the agents' ServiceAccount.
//!
//! There is no tenant-wide join token: [`RETIRED`] lists what older versions made, which the
//! bootstrap step deletes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::error::Error;

/// A bootstrap token `id.secret`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// 6 characters `[a-z0-9]`.
    pub id: String,
    /// 16 characters `[a-z0-9]`.
    pub secret: String,
}

impl BootstrapToken {
    /// A new random token.
    pub fn generate() -> Result<BootstrapToken, Error> {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        use std::io::Read;
        let mut urandom =
            std::fs::File::open("/dev/urandom").map_err(Error::io("read", "/dev/urandom"))?;
        // Bytes of 252 (= 7 * 36) and above are rejected, so `% 36` is unbiased.
        let mut s = String::with_capacity(22);
        while s.len() < 22 {
            let mut buf = [0u8; 32];
            urandom
                .read_exact(&mut buf)
                .map_err(Error::io("read", "/dev/urandom"))?;
            s.extend(
                buf.iter()
                    .filter(|b| **b < 252)
                    .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
                    .take(22 - s.len()),
            );
        }
        Ok(BootstrapToken {
            id: s[..6].to_string(),
            secret: s[6..].to_string(),
        })
    }

    /// Parses `id.secret`.
    pub fn parse(s: &str) -> Option<BootstrapToken> {
        let (id, secret) = s.trim().split_once('.')?;
        let ok = |x: &str, n| {
            x.len() == n
                && x.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        (ok(id, 6) && ok(secret, 16)).then(|| BootstrapToken {
            id: id.into(),
            secret: secret.into(),
        })
    }

    /// `id.secret`.
    pub fn token(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// The ClusterRoleBinding older versions made that let any bootstrap token holder obtain
/// any node's client certificate (kube-controller-manager's blanket `nodeclient` approval).
pub const RETIRED: &str = "kubeadm:node-autoapprove-bootstrap";

/// The objects to apply into the tenant.
pub fn objects(endpoint: &str, ca_pem: &[u8]) -> Vec<Value> {
    let cluster_info = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "", "cluster": {
            "server": endpoint,
            "certificate-authority-data": STANDARD.encode(ca_pem),
        }}],
        "contexts": [],
        "users": [],
    });
    let cluster_info = serde_yaml::to_string(&cluster_info).expect("JSON renders as YAML");
    let crb = |name: &str, role: &str, kind: &str, subject: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}],
        })
    };
    vec![
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cluster-info", "namespace": "kube-public"},
            "data": {"kubeconfig": cluster_info},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cluster-info"], "verbs": ["get"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubeadm:bootstrap-signer-clusterinfo"},
            // Anonymous for kubeadm-style discovery, bootstrappers for token holders.
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous"},
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:bootstrappers"},
            ],
        }),
        crb(
            "kubeadm:kubelet-bootstrap",
            "system:node-bootstrapper",
            "Group",
            "system:bootstrappers",
        ),
        crb(
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            "Group",
            "system:nodes",
        ),
        crb(
            "system:konnectivity-server",
            "system:auth-delegator",
            "User",
            "system:konnectivity-server",
        ),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": super::render::AGENT_SERVICE_ACCOUNT, "namespace": "kube-system"},
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = BootstrapToken::generate().unwrap();
        assert_eq!(BootstrapToken::parse(&t.token()), Some(t.clone()));
        for bad in [
            "abc.def",
            "ABCDEF.0123456789abcdef",
            "abcdef0123456789abcdef",
            "abcdef.0123456789abcde!",
        ] {
            assert_eq!(BootstrapToken::parse(bad), None, "{bad}");
        }
        assert_ne!(BootstrapToken::generate().unwrap(), t);
    }

    #[test]
    fn objects_carry_endpoint_and_ca_and_no_blanket_approval() {
        let objs = objects("https://127.0.0.1:1234", b"CA");
        let ci = objs
            .iter()
            .find(|o| o["metadata"]["name"] == "cluster-info")
            .unwrap();
        let kc: Value = serde_yaml::from_str(ci["data"]["kubeconfig"].as_str().unwrap()).unwrap();
        assert_eq!(
            kc["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:1234"
        );
        assert_eq!(
            kc["clusters"][0]["cluster"]["certificate-authority-data"],
            STANDARD.encode("CA")
        );
        assert!(
            !objs.iter().any(|o| o["kind"] == "Secret"),
            "no tenant-wide token"
        );
        assert!(
            !objs.iter().any(|o| o["roleRef"]["name"]
                == "system:certificates.k8s.io:certificatesigningrequests:nodeclient"),
            "no blanket node-client approval"
        );
        let names: Vec<&str> = objs
            .iter()
            .filter_map(|o| o["metadata"]["name"].as_str())
            .collect();
        for n in [
            "kubeadm:kubelet-bootstrap",
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:konnectivity-server",
        ] {
            assert!(names.contains(&n), "{n}");
        }
    }
}
