//! What a running operator publishes for machines: the machine API's URL and CA pin in the
//! ConfigMap `tether-system/tether-machine-api`, read with the pinned kubectl (as a site
//! operator or tether-pxe would find them).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_api::machine_api::{CONFIG_MAP, KEY_CA_PIN, KEY_URL, NAMESPACE};
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
            .args(["-n", NAMESPACE, "get", "configmap", CONFIG_MAP, "-o"])
            .arg(format!(
                "jsonpath={{.data.{KEY_URL}}} {{.data.{KEY_CA_PIN}}}"
            ))
            .output()
            .map_err(Error::io("run", &kubectl))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some((url, pin)) = text.split_once(' ')
            && !url.is_empty()
        {
            let pin = pin
                .parse()
                .map_err(|e: tether_boot::Error| Error::Command {
                    command: format!("read ConfigMap {CONFIG_MAP}"),
                    detail: e.to_string(),
                })?;
            return Ok((url.to_string(), pin));
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
