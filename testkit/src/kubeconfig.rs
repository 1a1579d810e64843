//! Kubeconfig files with embedded credentials, and clients built from them.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::pki::CertPair;
use crate::{Error, Result};

/// Renders a kubeconfig for `server` that trusts `ca_pem` and authenticates with `client`.
pub fn render(server: &str, ca_pem: &str, user: &str, client: &CertPair) -> String {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": server,
            "certificate-authority-data": STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": STANDARD.encode(&client.cert_pem),
            "client-key-data": STANDARD.encode(&client.key_pem),
        }}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        "current-context": "test",
    });
    serde_yaml::to_string(&doc).expect("a JSON value always renders as YAML")
}

/// Writes a kubeconfig (mode 0600: it holds a private key).
pub fn write(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("write", path))?;
    std::io::Write::write_all(&mut f, contents.as_bytes()).map_err(Error::io("write", path))
}

/// A client for the kubeconfig at `path`.
pub async fn client(path: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(path).map_err(|e| Error::Kube(e.to_string()))?;
    client_for(kc).await
}

/// A client for a kubeconfig held in memory.
pub async fn client_from_yaml(yaml: &str) -> Result<kube::Client> {
    let kc = Kubeconfig::from_yaml(yaml).map_err(|e| Error::Kube(e.to_string()))?;
    client_for(kc).await
}

async fn client_for(kc: Kubeconfig) -> Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kube(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| Error::Kube(e.to_string()))
}
