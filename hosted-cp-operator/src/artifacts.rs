//! The artifact store `standalone` runs (DESIGN.md "Artifacts and images without a
//! registry"): CNCF distribution's `registry` from the binary cache, supervised like the
//! management components, storing under `DIR/registry/data`, listening on the advertise
//! address so nodes reach it, its address published in ConfigMap
//! `tether-system/tether-registry` (`address`). Plain HTTP: nodes and the agent pull by
//! digest, so what arrives is checked whatever the transport; TLS is planned.
//!
//! Pushing is the caller's (xtask, tests; later the operator): the store starts empty.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_api::artifacts::{CONFIG_MAP, KEY_ADDRESS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::controlplane::component::{ComponentSpec, Probe, Program};
use crate::error::Error;
use crate::fs::write_atomic;

/// The registry's configuration: filesystem storage under `data`, HTTP on `addr`, deletes
/// allowed (old node artifacts are garbage-collected later), no auth (pulls are by digest;
/// the store listens only where standalone was told nodes are).
pub fn config(data: &Path, addr: SocketAddr) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        data.display()
    )
}

/// Writes `dir/config.yml` and returns the component that serves it.
pub fn component(dir: &Path, addr: SocketAddr) -> Result<ComponentSpec, Error> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).map_err(Error::io("create", &data))?;
    let file = dir.join("config.yml");
    write_atomic(&file, config(&data, addr).as_bytes())?;
    Ok(ComponentSpec {
        program: Program::Registry,
        version: String::new(),
        args: vec!["serve".into(), file.display().to_string()],
        files: vec![],
        env: Default::default(),
        ports: vec![("registry", addr.port())],
        probe: Probe {
            scheme: "http",
            port: "registry",
            path: "/v2/",
        },
    })
}

/// Waits until the registry answers `GET /v2/` with 200.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match v2_status(addr).await {
            Ok(200) => return Ok(()),
            Ok(code) => format!("GET /v2/ answered {code}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "the artifact store on {addr} is not ready after {timeout:?}: {last} \
                 (its log: DIR/management/tenants/registry/logs/registry.log)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status code of `GET /v2/`: a readiness probe, so a bare HTTP/1.0 request is enough.
async fn v2_status(addr: SocketAddr) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP status line"))
}

/// Publishes the store's address for nodes, tether-pxe and tests.
pub async fn publish(
    client: &kube::Client,
    namespace: &str,
    addr: SocketAddr,
) -> Result<(), Error> {
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": namespace},
        "data": {KEY_ADDRESS: addr.to_string()},
    });
    crate::kube::apply_objects(client, &[cm]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_storage_and_address() {
        let c = config(
            Path::new("/d/registry/data"),
            "10.0.0.1:5000".parse().unwrap(),
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&c).unwrap();
        assert_eq!(
            v["storage"]["filesystem"]["rootdirectory"].as_str(),
            Some("/d/registry/data")
        );
        assert_eq!(v["http"]["addr"].as_str(), Some("10.0.0.1:5000"));
        assert_eq!(v["storage"]["delete"]["enabled"].as_bool(), Some(true));
        assert_eq!(v["version"].as_f64(), Some(0.1));
    }
}
