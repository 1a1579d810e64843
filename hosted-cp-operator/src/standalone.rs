//! `tether-operator standalone --data-dir DIR`: a whole management plane on one machine.
//!
//! - `DIR/management/`: an etcd (loopback, plain) and a kube-apiserver for the management
//!   API, both from the binary cache and supervised like tenant components;
//! - `DIR/datastore/`: the default tenant datastore — a second etcd with TLS, client
//!   certificate auth and etcd auth enabled, administered as `root` — published as the
//!   `default` DataStore with its credentials in `tether-system` Secrets;
//! - `DIR/management.kubeconfig`: an admin kubeconfig for the management API;
//! - the controller on the process runtime (`DIR/tenants/…`).
//!
//! Certificates and ports are created once and reused, so a restart with the same DIR
//! serves the same endpoints and keeps all state. SIGINT/SIGTERM stop tenants and the
//! management plane; processes of a killed operator are reaped by the next start.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tether_upstream::Component;

use crate::binaries::binary;
use crate::controller::{self, Context};
use crate::datastore::EtcdAdmin;
use crate::error::Error;
use crate::fs::{ensure_file, read, write_atomic};
use crate::kube::{MANAGER, client_from_kubeconfig, dynamic_api, render_kubeconfig, wait_readyz};
use crate::ports::free_port;
use crate::render::{ComponentSpec, Probe, Program};
use crate::runtime::Runtime;
use crate::runtime::kubernetes::KubernetesRuntime;
use crate::runtime::process::{BinaryResolver, ProcessRuntime, SecretData};
use crate::x509::{self, LeafSpec, ca_and_leaf};

/// The operator's namespace in standalone mode.
pub const NAMESPACE: &str = "tether-system";

#[derive(serde::Serialize, serde::Deserialize)]
struct MgmtPorts {
    etcd: u16,
    etcd_peer: u16,
    api: u16,
    ds: u16,
    ds_peer: u16,
}

/// Which runtime standalone runs tenants with. `Kubernetes` only makes sense to check the
/// Deployments the production path would create: standalone's management API has no nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Supervised local processes.
    #[default]
    Process,
    /// Deployments + Services in the management cluster.
    Kubernetes,
}

/// Runs the management plane and the operator until SIGINT/SIGTERM.
pub async fn run(data_dir: &Path, kind: RuntimeKind) -> Result<(), Error> {
    let started = Instant::now();
    std::fs::create_dir_all(data_dir).map_err(Error::io("create", data_dir))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(Error::io("resolve", data_dir))?;
    // First: reap whatever a killed predecessor left running for tenants, before anything
    // else binds ports or reports ready.
    let process_runtime = Arc::new(ProcessRuntime::new(
        &data_dir,
        crate::runtime::process::cache_resolver(),
    )?);
    let mgmt = data_dir.join("management");
    let pki_dir = mgmt.join("pki");
    std::fs::create_dir_all(&pki_dir).map_err(Error::io("create", &pki_dir))?;

    // Ports, stable across restarts.
    let ports_file = mgmt.join("ports.json");
    let ports: MgmtPorts = match std::fs::read(&ports_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(p) => p,
        None => {
            let mut t = HashSet::new();
            let p = MgmtPorts {
                etcd: free_port(&mut t)?,
                etcd_peer: free_port(&mut t)?,
                api: free_port(&mut t)?,
                ds: free_port(&mut t)?,
                ds_peer: free_port(&mut t)?,
            };
            write_atomic(&ports_file, &serde_json::to_vec(&p).expect("serialise"))?;
            p
        }
    };

    // Certificates, created once.
    let loopback = [IpAddr::from([127, 0, 0, 1])];
    let names = [
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
    ];
    ca_and_leaf(
        &pki_dir,
        "ca",
        "apiserver",
        &LeafSpec {
            cn: "kube-apiserver",
            orgs: &[],
            dns: &names,
            ips: &loopback,
            server: true,
            client: false,
        },
    )?;
    ca_and_leaf(
        &pki_dir,
        "ca",
        "admin",
        &LeafSpec {
            cn: "tether-admin",
            orgs: &["system:masters"],
            dns: &[],
            ips: &[],
            server: false,
            client: true,
        },
    )?;
    ca_and_leaf(
        &pki_dir,
        "etcd-ca",
        "etcd-server",
        &LeafSpec {
            cn: "etcd",
            orgs: &[],
            dns: &["localhost".to_string()],
            ips: &loopback,
            server: true,
            client: false,
        },
    )?;
    ca_and_leaf(
        &pki_dir,
        "etcd-ca",
        "etcd-root",
        &LeafSpec {
            cn: "root",
            orgs: &[],
            dns: &[],
            ips: &[],
            server: false,
            client: true,
        },
    )?;
    let sa_key = ensure_file(&pki_dir.join("sa.key"), || {
        Ok(x509::service_account_key()?.0.into_bytes())
    })?;
    if !pki_dir.join("sa.pub").exists() {
        write_atomic(
            &pki_dir.join("sa.pub"),
            x509::public_key_pem(&sa_key)?.as_bytes(),
        )?;
    }

    // The management components run under the same supervisor as tenants.
    let resolve: BinaryResolver = Arc::new(|c: &ComponentSpec| binary(c.program.upstream()));
    let mgmt_rt = ProcessRuntime::new(&mgmt, resolve)?;
    let pki_rel = |f: &str| format!("{}/{f}", pki_dir.display());
    let etcd = single_member_etcd(
        "management",
        &mgmt.join("etcd"),
        "http",
        (ports.etcd, ports.etcd_peer),
        vec![],
    );
    let apiserver = ComponentSpec {
        program: Program::KubeApiserver,
        version: String::new(),
        args: vec![
            format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.api),
            format!("--tls-cert-file={}", pki_rel("apiserver.crt")),
            format!("--tls-private-key-file={}", pki_rel("apiserver.key")),
            format!("--client-ca-file={}", pki_rel("ca.crt")),
            format!("--service-account-key-file={}", pki_rel("sa.pub")),
            format!("--service-account-signing-key-file={}", pki_rel("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
        ],
        files: vec![],
        env: BTreeMap::new(),
        ports: vec![],
        probe: Probe {
            scheme: "https",
            port: "",
            path: "/readyz",
        },
    };
    mgmt_rt.apply("management", &[etcd], &SecretData::new())?;
    // The apiserver gets its own slot so restarting one never restarts the other.
    mgmt_rt.apply("management-apiserver", &[apiserver], &SecretData::new())?;

    // The default datastore: etcd with TLS, client-certificate auth and etcd auth.
    let ds_dir = data_dir.join("datastore");
    let ds_rt = ProcessRuntime::new(
        &ds_dir,
        Arc::new(|_: &ComponentSpec| binary(Component::Etcd)),
    )?;
    let ds_etcd = single_member_etcd(
        "datastore",
        &ds_dir.join("etcd"),
        "https",
        (ports.ds, ports.ds_peer),
        vec![
            format!("--cert-file={}", pki_rel("etcd-server.crt")),
            format!("--key-file={}", pki_rel("etcd-server.key")),
            format!("--trusted-ca-file={}", pki_rel("etcd-ca.crt")),
            "--client-cert-auth=true".into(),
            "--auto-compaction-mode=periodic".into(),
            "--auto-compaction-retention=5m".into(),
        ],
    );
    ds_rt.apply("datastore", &[ds_etcd], &SecretData::new())?;

    // Management kubeconfig and client.
    let server = format!("https://127.0.0.1:{}", ports.api);
    let kc = render_kubeconfig(
        "management",
        &server,
        &read(&pki_dir, "ca.crt")?,
        "tether-admin",
        &read(&pki_dir, "admin.crt")?,
        &read(&pki_dir, "admin.key")?,
    );
    let kc_path = data_dir.join("management.kubeconfig");
    write_atomic(&kc_path, kc.as_bytes())?;
    let client = client_from_kubeconfig(&kc).await?;
    wait_readyz(&client, Duration::from_secs(90)).await?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "management API ready"
    );

    // etcd auth: root user (certificate CN "root") with the root role, then enable.
    let etcd_admin = EtcdAdmin {
        etcdctl: crate::binaries::etcdctl()?,
        endpoints: vec![format!("https://127.0.0.1:{}", ports.ds)],
        creds: ds_dir.join("admin"),
    };
    crate::datastore::write_creds(
        &etcd_admin.creds,
        &read(&pki_dir, "etcd-ca.crt")?,
        &read(&pki_dir, "etcd-root.crt")?,
        &read(&pki_dir, "etcd-root.key")?,
    )?;
    etcd_admin.enable_auth(Duration::from_secs(30)).await?;

    // CRDs, namespace, DataStore credentials and the default DataStore.
    install_crds(&client).await?;
    let pp = PatchParams::apply(MANAGER).force();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.patch(
        NAMESPACE,
        &pp,
        &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        ),
    )
    .await
    .map_err(Error::kube("apply namespace"))?;
    let b64 = |b: Vec<u8>| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let objects = vec![
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "default-datastore-ca", "namespace": NAMESPACE},
            "data": {"ca.crt": b64(read(&pki_dir, "etcd-ca.crt")?), "ca.key": b64(read(&pki_dir, "etcd-ca.key")?)}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "default-datastore-root", "namespace": NAMESPACE},
            "data": {"tls.crt": b64(read(&pki_dir, "etcd-root.crt")?), "tls.key": b64(read(&pki_dir, "etcd-root.key")?)}}),
        json!({"apiVersion": "tether.dev/v1alpha1", "kind": "DataStore", "metadata": {"name": controller::DEFAULT_DATASTORE},
            "spec": {"driver": "etcd", "endpoints": [format!("127.0.0.1:{}", ports.ds)], "tlsConfig": {
                "certificateAuthority": {
                    "certificate": {"name": "default-datastore-ca", "key": "ca.crt"},
                    "privateKey": {"name": "default-datastore-ca", "key": "ca.key"}},
                "clientCertificate": {
                    "certificate": {"name": "default-datastore-root", "key": "tls.crt"},
                    "privateKey": {"name": "default-datastore-root", "key": "tls.key"}}}}}),
    ];
    for obj in &objects {
        let (api, name) = dynamic_api(&client, obj)?;
        api.patch(&name, &pp, &Patch::Apply(obj))
            .await
            .map_err(Error::kube(format!("apply {name}")))?;
    }
    tracing::info!(
        kubeconfig = %kc_path.display(),
        ms = started.elapsed().as_millis() as u64,
        "standalone management plane ready"
    );
    write_atomic(&data_dir.join("ready"), b"ok\n")?;

    let runtime = match kind {
        RuntimeKind::Process => Runtime::Process(process_runtime),
        RuntimeKind::Kubernetes => Runtime::Kubernetes(KubernetesRuntime {
            client: client.clone(),
            images: Default::default(),
        }),
    };
    serve(client, runtime.clone(), NAMESPACE, &data_dir).await;
    tracing::info!("stopping tenants and the management plane");
    let _ = std::fs::remove_file(data_dir.join("ready"));
    runtime.shutdown();
    ds_rt.shutdown();
    mgmt_rt.shutdown();
    // Give supervisors time to escalate and remove pidfiles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Applies the operator's CRDs and waits until they are established.
pub async fn install_crds(client: &kube::Client) -> Result<(), Error> {
    let pp = PatchParams::apply(MANAGER).force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(Error::kube(format!("apply CRD {name}")))?;
    }
    for crd in crate::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let cond = kube::runtime::conditions::is_crd_established();
        tokio::time::timeout(
            Duration::from_secs(30),
            kube::runtime::wait::await_condition(crds.clone(), &name, cond),
        )
        .await
        .map_err(|_| Error::Timeout(format!("CRD {name} established")))?
        .map_err(|e| Error::Invalid(format!("wait for CRD {name}: {e}")))?;
    }
    Ok(())
}

/// Runs the controller with `runtime` until SIGINT/SIGTERM. DataStore credentials are read
/// from `namespace`; `data_dir` holds etcdctl credentials and `metrics.json`.
pub async fn serve(client: kube::Client, runtime: Runtime, namespace: &str, data_dir: &Path) {
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "tether-operator".into(),
            instance: None,
        },
    );
    let ctx = Arc::new(Context {
        recorder,
        client,
        runtime,
        namespace: namespace.into(),
        data_dir: data_dir.to_path_buf(),
        known_versions: crate::binaries::known_versions(),
        metrics: Mutex::new(Default::default()),
    });
    metrics_dump(ctx.clone(), data_dir.join("metrics.json"));
    controller::run(ctx).await;
}

/// `tether-operator run`: the operator against the cluster of the ambient kubeconfig (or
/// in-cluster service account), for a real management cluster.
pub async fn run_in_cluster(
    data_dir: &Path,
    namespace: &str,
    kind: RuntimeKind,
    crds: bool,
) -> Result<(), Error> {
    std::fs::create_dir_all(data_dir).map_err(Error::io("create", data_dir))?;
    let client = kube::Client::try_default()
        .await
        .map_err(Error::kube("connect to the cluster"))?;
    if crds {
        install_crds(&client).await?;
    }
    let runtime = match kind {
        RuntimeKind::Process => Runtime::Process(Arc::new(ProcessRuntime::new(
            data_dir,
            crate::runtime::process::cache_resolver(),
        )?)),
        RuntimeKind::Kubernetes => Runtime::Kubernetes(KubernetesRuntime {
            client: client.clone(),
            images: Default::default(),
        }),
    };
    serve(client, runtime.clone(), namespace, data_dir).await;
    runtime.shutdown();
    Ok(())
}

/// Writes step timings every 2 s to `path` (for `cargo xtask bench cp`).
fn metrics_dump(ctx: Arc<Context>, path: PathBuf) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let json = {
                let m = ctx.metrics.lock().unwrap_or_else(|e| e.into_inner());
                let ms = |v: &Vec<Duration>| {
                    v.iter()
                        .map(|d| d.as_secs_f64() * 1000.0)
                        .collect::<Vec<_>>()
                };
                json!({
                    "reconciles_ms": ms(&m.reconciles),
                    "steps_ms": m.steps.iter().map(|(k, v)| (k.to_string(), json!(ms(v)))).collect::<serde_json::Map<_, _>>(),
                })
            };
            let _ = write_atomic(&path, json.to_string().as_bytes());
        }
    });
}

/// A one-member etcd on loopback named `name`, serving clients over `scheme` on
/// `ports.0` (peers stay plain HTTP on `ports.1`, also loopback-only), probed on `/health`.
/// `extra` carries TLS and compaction flags.
fn single_member_etcd(
    name: &str,
    data_dir: &std::path::Path,
    scheme: &'static str,
    (client, peer): (u16, u16),
    extra: Vec<String>,
) -> ComponentSpec {
    let mut args = vec![
        format!("--name={name}"),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={scheme}://127.0.0.1:{client}"),
        format!("--advertise-client-urls={scheme}://127.0.0.1:{client}"),
        format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-cluster={name}=http://127.0.0.1:{peer}"),
    ];
    args.extend(extra);
    args.push("--listen-metrics-urls=".into());
    ComponentSpec {
        program: Program::Etcd,
        version: String::new(),
        args,
        files: vec![],
        env: BTreeMap::new(),
        ports: vec![],
        probe: Probe {
            scheme,
            port: "",
            path: "/health",
        },
    }
}
