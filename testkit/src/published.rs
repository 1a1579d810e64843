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

/// ConfigMap `tether-system/<name>` as the pinned kubectl reads it; the inner `Err` carries
/// kubectl's stderr when it could not get it (not there yet, say).
fn config_map(kubeconfig: &Path, name: &str) -> Result<std::result::Result<ConfigMap, String>> {
    let kubectl = crate::binaries::binary(Component::Kubectl)?;
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["-n", NAMESPACE, "get", "configmap", name, "-o", "json"])
        .output()
        .map_err(Error::io("run", &kubectl))?;
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    serde_json::from_slice(&out.stdout)
        .map(Ok)
        .map_err(|e| Error::Command {
            command: format!("read ConfigMap {NAMESPACE}/{name}"),
            detail: e.to_string(),
        })
}

/// The machine API's URL and pin, waiting up to `timeout` for them to be published.
pub fn machine_api(kubeconfig: &Path, timeout: Duration) -> Result<(String, CaPin)> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match config_map(kubeconfig, CONFIG_MAP)? {
            Ok(cm) => {
                // Published once both keys are there; then they must be valid.
                let data = cm.data.clone().unwrap_or_default();
                if data.contains_key(KEY_URL) && data.contains_key(KEY_CA_PIN) {
                    return published(&cm).map_err(|detail| Error::Command {
                        command: format!("read ConfigMap {CONFIG_MAP}"),
                        detail,
                    });
                }
                String::new()
            }
            Err(stderr) => stderr,
        };
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                component: "machine API".into(),
                seconds: timeout.as_secs(),
                reason: format!("ConfigMap {NAMESPACE}/{CONFIG_MAP} not published"),
                log_tail: last,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The artifact store's address (`host:port`) from ConfigMap `tether-system/tether-registry`.
pub fn artifact_store(kubeconfig: &Path) -> Result<String> {
    let name = artifacts::CONFIG_MAP;
    let missing = |detail: String| Error::Command {
        command: format!("read ConfigMap {NAMESPACE}/{name}"),
        detail,
    };
    let cm = config_map(kubeconfig, name)?.map_err(missing)?;
    cm.data
        .and_then(|d| d.get(artifacts::KEY_ADDRESS).cloned())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| missing(format!("no {}", artifacts::KEY_ADDRESS)))
}
