//! What a running operator publishes for machines: the machine API's URL and CA pin in the
//! ConfigMap `tether-system/tether-machine-api` and the artifact store's address in
//! `tether-system/tether-registry`, fetched with the pinned kubectl (as a site operator or
//! tether-pxe would find them).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use tether_api::artifacts;
use tether_api::machine_api::{CONFIG_MAP, KEY_CA_PIN, KEY_URL, NAMESPACE, published};
use tether_boot::CaPin;
use tether_upstream::Component;

use crate::{Error, Result};

/// The machine API's URL and pin, waiting up to `timeout` for them to be published.
pub fn machine_api(kubeconfig: &Path, timeout: Duration) -> Result<(String, CaPin)> {
    let kubectl = crate::binaries::binary(Component::Kubectl)?;
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "-n",
                NAMESPACE,
                "get",
                "configmap",
                CONFIG_MAP,
                "-o",
                "json",
            ])
            .output()
            .map_err(Error::io("run", &kubectl))?;
        if out.status.success() {
            let cm: ConfigMap =
                serde_json::from_slice(&out.stdout).map_err(|e| Error::Command {
                    command: format!("read ConfigMap {CONFIG_MAP}"),
                    detail: e.to_string(),
                })?;
            // Published once both keys are there; then they must be valid.
            let data = cm.data.clone().unwrap_or_default();
            if data.contains_key(KEY_URL) && data.contains_key(KEY_CA_PIN) {
                return published(&cm).map_err(|detail| Error::Command {
                    command: format!("read ConfigMap {CONFIG_MAP}"),
                    detail,
                });
            }
        }
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                component: "machine API".into(),
                seconds: timeout.as_secs(),
                reason: format!("ConfigMap {NAMESPACE}/{CONFIG_MAP} not published"),
                log_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The artifact store's address (`host:port`) from ConfigMap `tether-system/tether-registry`.
pub fn artifact_store(kubeconfig: &Path) -> Result<String> {
    let kubectl = crate::binaries::binary(Component::Kubectl)?;
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "-n",
            NAMESPACE,
            "get",
            "configmap",
            artifacts::CONFIG_MAP,
            "-o",
        ])
        .arg(format!("jsonpath={{.data.{}}}", artifacts::KEY_ADDRESS))
        .output()
        .map_err(Error::io("run", &kubectl))?;
    let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || address.is_empty() {
        return Err(Error::Command {
            command: format!("read ConfigMap {NAMESPACE}/{}", artifacts::CONFIG_MAP),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(address)
}
