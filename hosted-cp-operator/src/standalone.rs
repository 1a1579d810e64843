//! `tether-operator standalone --data-dir DIR`: a whole management plane on one machine.
//!
//! - `DIR/management/`: an etcd (loopback, plain) and a kube-apiserver for the management
//!   API, both from the binary cache and supervised like tenant components;
//! - `DIR/datastore/`: the default tenant datastore — a second etcd with TLS, client
//!   certificate auth and etcd auth enabled, administered as `root` — published as the
//!   `default` DataStore with its credentials in `tether-system` Secrets;
//! - `DIR/management.kubeconfig`: an admin kubeconfig for the management API;
//! - the operator's controllers ([`crate::manager`]) on the process runtime (`DIR/tenants/…`),
//!   and the machine API on `--advertise-address` (default loopback), the address machines on
//!   the node network reach, where tenant control planes are published too;
//! - `DIR/registry/`: the artifact store ([`crate::artifacts`]) on the same address.
//!
//! Certificates and ports are created once and reused, so a restart with the same DIR
//! serves the same endpoints and keeps all state. SIGINT/SIGTERM stop tenants and the
//! management plane; processes of a killed operator are reaped by the next start.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_upstream::Component;

use crate::artifacts;
use crate::binaries::binary;
use crate::controlplane::DEFAULT_DATASTORE;
use crate::controlplane::component::{
    ApiserverArgs, ComponentSpec, Probe, Program, single_member_etcd,
};
use crate::controlplane::datastore::{EtcdAdmin, write_creds};
use crate::controlplane::runtime::Runtime;
use crate::controlplane::runtime::process::{
    BinaryResolver, ProcessRuntime, SecretData, cache_resolver,
};
use crate::error::Error;
use crate::fs::{ensure_file, read, write_atomic};
use crate::kube::{apply_objects, client_from_kubeconfig, render_kubeconfig, wait_readyz};
use crate::manager::{self, RuntimeKind};
use crate::ports::free_port;
use crate::x509::{self, LeafSpec};

/// The operator's namespace in standalone mode.
pub const NAMESPACE: &str = "tether-system";

/// The management plane's ports, allocated once and kept in `management/ports.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct MgmtPorts {
    etcd: u16,
    etcd_peer: u16,
    api: u16,
    ds: u16,
    ds_peer: u16,
    /// Added after the first release of this file: older files lack it and get one.
    #[serde(default)]
    machine_api: Option<u16>,
    /// The artifact store's; added later still, filled the same way.
    #[serde(default)]
    registry: Option<u16>,
}

/// The running management plane: its supervisors and an admin client.
struct ManagementPlane {
    management: ProcessRuntime,
    datastore: ProcessRuntime,
    client: kube::Client,
    machine_api_port: u16,
}

/// Runs the management plane and the operator until SIGINT/SIGTERM.
pub async fn run(
    data_dir: &Path,
    kind: RuntimeKind,
    advertise: IpAddr,
    machine_api: &crate::machine_api::Tuning,
) -> Result<(), Error> {
    let started = Instant::now();
    std::fs::create_dir_all(data_dir).map_err(Error::io("create", data_dir))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(Error::io("resolve", data_dir))?;
    // First: reap whatever a killed predecessor left running for tenants, before anything
    // else binds ports or reports ready.
    let process_runtime = Arc::new(
        ProcessRuntime::new(&data_dir, cache_resolver())?
            .with_advertise_address((!advertise.is_loopback()).then(|| advertise.to_string())),
    );
    let plane = start(&data_dir, advertise, started).await?;
    let api_port = plane.machine_api_port;
    tracing::info!(
        kubeconfig = %data_dir.join("management.kubeconfig").display(),
        ms = started.elapsed().as_millis() as u64,
        "standalone management plane ready"
    );
    write_atomic(&data_dir.join("ready"), b"ok\n")?;

    let runtime = match kind {
        RuntimeKind::Process => Runtime::Process(process_runtime),
        RuntimeKind::Kubernetes => Runtime::kubernetes(plane.client.clone()),
    };
    let url = format!("https://{}", std::net::SocketAddr::new(advertise, api_port));
    let settings = machine_api.settings(std::net::SocketAddr::new(advertise, api_port), url);
    let served = manager::serve(
        plane.client,
        runtime.clone(),
        NAMESPACE,
        &data_dir,
        Some(settings),
    )
    .await;
    tracing::info!("stopping tenants and the management plane");
    let _ = std::fs::remove_file(data_dir.join("ready"));
    // Tenants first, then the datastore they use, then the management API; each waits
    // until its processes are gone (they sit in process groups of their own and would
    // outlive the operator).
    runtime.shutdown().await;
    plane.datastore.shutdown().await;
    plane.management.shutdown().await;
    served
}

/// Starts the management API and the default datastore, and publishes the latter.
async fn start(
    data_dir: &Path,
    advertise: IpAddr,
    started: Instant,
) -> Result<ManagementPlane, Error> {
    let mgmt = data_dir.join("management");
    let pki = mgmt.join("pki");
    std::fs::create_dir_all(&pki).map_err(Error::io("create", &pki))?;
    let ports = ports(&mgmt.join("ports.json"))?;
    certificates(&pki)?;

    // The management components run under the same supervisor as tenants.
    let resolve: BinaryResolver = Arc::new(|c: &ComponentSpec| binary(c.program.upstream()));
    let management = ProcessRuntime::new(&mgmt, resolve)?;
    let etcd = single_member_etcd(
        "management",
        &mgmt.join("etcd"),
        "http",
        (ports.etcd, ports.etcd_peer),
        vec![],
    );
    management.apply("management", &[etcd], &SecretData::new())?;
    // The apiserver gets its own slot so restarting one never restarts the other.
    let apiserver = management_apiserver(&ports, &pki);
    management.apply("management-apiserver", &[apiserver], &SecretData::new())?;
    // The artifact store, where nodes reach it; its own slot as well.
    let store = std::net::SocketAddr::new(advertise, ports.registry.expect("ports() fills it"));
    let registry = artifacts::component(&data_dir.join("registry"), store)?;
    management.apply("registry", &[registry], &SecretData::new())?;

    let ds_dir = data_dir.join("datastore");
    let datastore = ProcessRuntime::new(
        &ds_dir,
        Arc::new(|_: &ComponentSpec| binary(Component::Etcd)),
    )?;
    datastore.apply(
        "datastore",
        &[datastore_etcd(&ports, &pki, &ds_dir)],
        &SecretData::new(),
    )?;

    let client = management_client(data_dir, &pki, ports.api).await?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "management API ready"
    );
    enable_datastore_auth(&pki, &ds_dir, ports.ds).await?;
    crate::crds::install(&client).await?;
    publish_datastore(&client, &pki, ports.ds).await?;
    artifacts::wait_ready(store, Duration::from_secs(30)).await?;
    artifacts::publish(&client, NAMESPACE, store).await?;
    tracing::info!(address = %store, "artifact store serving");
    Ok(ManagementPlane {
        management,
        datastore,
        client,
        machine_api_port: ports.machine_api.expect("ports() fills it"),
    })
}

/// The management plane's ports: the recorded ones, or new free ones recorded now, so a
/// restart serves the same endpoints.
fn ports(file: &Path) -> Result<MgmtPorts, Error> {
    let mut t = HashSet::new();
    let mut p = match std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice::<MgmtPorts>(&b).ok())
    {
        Some(p) if p.machine_api.is_some() && p.registry.is_some() => return Ok(p),
        Some(p) => p,
        None => MgmtPorts {
            etcd: free_port(&mut t)?,
            etcd_peer: free_port(&mut t)?,
            api: free_port(&mut t)?,
            ds: free_port(&mut t)?,
            ds_peer: free_port(&mut t)?,
            machine_api: None,
            registry: None,
        },
    };
    t.extend([p.etcd, p.etcd_peer, p.api, p.ds, p.ds_peer]);
    t.extend(p.machine_api.into_iter().chain(p.registry));
    if p.machine_api.is_none() {
        p.machine_api = Some(free_port(&mut t)?);
    }
    if p.registry.is_none() {
        p.registry = Some(free_port(&mut t)?);
    }
    write_atomic(file, &serde_json::to_vec(&p).expect("serialise"))?;
    Ok(p)
}

/// The management API's CA, serving and admin certificates, the datastore's CA, serving
/// and root certificates, and the service-account key pair: made once, renewed on restart.
fn certificates(pki: &Path) -> Result<(), Error> {
    let loopback = [IpAddr::from([127, 0, 0, 1])];
    let names = [
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
    ];
    let localhost = ["localhost".to_string()];
    let admin_groups = ["system:masters"];
    x509::ca_and_leaf(
        pki,
        "ca",
        "apiserver",
        &LeafSpec::server("kube-apiserver", &names, &loopback),
    )?;
    x509::ca_and_leaf(
        pki,
        "ca",
        "admin",
        &LeafSpec::client("tether-admin", &admin_groups),
    )?;
    x509::ca_and_leaf(
        pki,
        "etcd-ca",
        "etcd-server",
        &LeafSpec::server("etcd", &localhost, &loopback),
    )?;
    x509::ca_and_leaf(pki, "etcd-ca", "etcd-root", &LeafSpec::client("root", &[]))?;
    let key = ensure_file(&pki.join("sa.key"), || {
        Ok(x509::service_account_key()?.0.into_bytes())
    })?;
    if !pki.join("sa.pub").exists() {
        write_atomic(&pki.join("sa.pub"), x509::public_key_pem(&key)?.as_bytes())?;
    }
    Ok(())
}

/// The management kube-apiserver: RBAC only (no nodes join the management plane).
fn management_apiserver(ports: &MgmtPorts, pki: &Path) -> ComponentSpec {
    ComponentSpec {
        program: Program::KubeApiserver,
        version: String::new(),
        args: ApiserverArgs {
            etcd_servers: &format!("http://127.0.0.1:{}", ports.etcd),
            bind_address: "127.0.0.1",
            advertise_address: "127.0.0.1",
            secure_port: ports.api,
            pki_dir: &pki.display().to_string(),
            client_ca: "ca.crt",
            service_account_issuer: "https://kubernetes.default.svc",
            service_cidr: "10.0.0.0/24",
            authorization_mode: "RBAC",
        }
        .args(),
        files: vec![],
        env: Default::default(),
        ports: vec![],
        probe: Probe {
            scheme: "https",
            port: "",
            path: "/readyz",
        },
    }
}

/// The default datastore: etcd with TLS and client-certificate auth (etcd auth is enabled
/// once it runs).
fn datastore_etcd(ports: &MgmtPorts, pki: &Path, dir: &Path) -> ComponentSpec {
    let file = |f: &str| pki.join(f).display().to_string();
    single_member_etcd(
        "datastore",
        &dir.join("etcd"),
        "https",
        (ports.ds, ports.ds_peer),
        vec![
            format!("--cert-file={}", file("etcd-server.crt")),
            format!("--key-file={}", file("etcd-server.key")),
            format!("--trusted-ca-file={}", file("etcd-ca.crt")),
            "--client-cert-auth=true".into(),
            "--auto-compaction-mode=periodic".into(),
            "--auto-compaction-retention=5m".into(),
        ],
    )
}

/// Writes `management.kubeconfig` and returns its client once the API is ready.
async fn management_client(data_dir: &Path, pki: &Path, port: u16) -> Result<kube::Client, Error> {
    let kc = render_kubeconfig(
        "management",
        &format!("https://127.0.0.1:{port}"),
        &read(pki, "ca.crt")?,
        "tether-admin",
        &read(pki, "admin.crt")?,
        &read(pki, "admin.key")?,
    );
    write_atomic(&data_dir.join("management.kubeconfig"), kc.as_bytes())?;
    let client = client_from_kubeconfig(&kc).await?;
    wait_readyz(&client, Duration::from_secs(90)).await?;
    Ok(client)
}

/// etcd auth on the datastore: root user (certificate CN "root") with the root role, then
/// enable.
async fn enable_datastore_auth(pki: &Path, ds_dir: &Path, port: u16) -> Result<(), Error> {
    let admin = EtcdAdmin {
        etcdctl: crate::binaries::etcdctl()?,
        endpoints: vec![format!("https://127.0.0.1:{port}")],
        creds: ds_dir.join("admin"),
    };
    write_creds(
        &admin.creds,
        &read(pki, "etcd-ca.crt")?,
        &read(pki, "etcd-root.crt")?,
        &read(pki, "etcd-root.key")?,
    )?;
    admin.enable_auth(Duration::from_secs(30)).await
}

/// The operator's namespace, the datastore's credentials as Secrets there and the
/// `default` DataStore naming them.
async fn publish_datastore(client: &kube::Client, pki: &Path, port: u16) -> Result<(), Error> {
    let b64 = |b: Vec<u8>| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "default-datastore-ca", "namespace": NAMESPACE},
            "data": {"ca.crt": b64(read(pki, "etcd-ca.crt")?), "ca.key": b64(read(pki, "etcd-ca.key")?)}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "default-datastore-root", "namespace": NAMESPACE},
            "data": {"tls.crt": b64(read(pki, "etcd-root.crt")?), "tls.key": b64(read(pki, "etcd-root.key")?)}}),
        json!({"apiVersion": "tether.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": DEFAULT_DATASTORE},
            "spec": {"driver": "etcd", "endpoints": [format!("127.0.0.1:{port}")], "tlsConfig": {
                "certificateAuthority": {
                    "certificate": {"name": "default-datastore-ca", "key": "ca.crt"},
                    "privateKey": {"name": "default-datastore-ca", "key": "ca.key"}},
                "clientCertificate": {
                    "certificate": {"name": "default-datastore-root", "key": "tls.crt"},
                    "privateKey": {"name": "default-datastore-root", "key": "tls.key"}}}}}),
    ];
    apply_objects(client, &objects).await
}
