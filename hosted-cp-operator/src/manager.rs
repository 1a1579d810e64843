//! Starts everything the operator runs — the TenantControlPlane and WorkerPool controllers,
//! the machine API and the Machine reachability sweep, the metrics dump — for both `tether-operator run` (a
//! real management cluster) and `standalone` (one machine). A new controller is started
//! next to the others in [`serve`]. A part that dies takes the process down with its error:
//! nothing runs half alive.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::controlplane::controller::{self, Context};
use crate::controlplane::runtime::Runtime;
use crate::controlplane::runtime::process::{ProcessRuntime, cache_resolver};
use crate::error::Error;
use crate::fs::write_atomic;

/// Which runtime tenants run with. In standalone, `Kubernetes` only renders the Deployments
/// the production path would create: standalone's management API has no nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Supervised local processes.
    #[default]
    Process,
    /// Deployments + Services in the management cluster.
    Kubernetes,
}

/// Runs every controller with `runtime`, and the machine API when `machine_api` is given,
/// until SIGINT/SIGTERM. DataStore credentials are read from `namespace`; `data_dir` holds
/// etcdctl credentials and `metrics.json`.
pub async fn serve(
    client: kube::Client,
    runtime: Runtime,
    namespace: &str,
    data_dir: &Path,
    machine_api: Option<crate::machine_api::Settings>,
) -> Result<(), Error> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let node_defaults = machine_api
        .as_ref()
        .map(|s| {
            (
                s.node_ntp.clone(),
                s.node_dns.iter().map(|ip| ip.to_string()).collect(),
            )
        })
        .unwrap_or_default();
    let api_task = match machine_api {
        Some(settings) => {
            let report = settings.report_seconds;
            let running =
                crate::machine_api::start(client.clone(), namespace, settings, stopped).await?;
            let sweep = tokio::spawn(crate::machines::reachability::run(client.clone(), report));
            let api = running.task;
            // The sweep never returns: its ending is a failure of the machine API's side.
            Some(tokio::spawn(async move {
                tokio::select! {
                    r = api => r.unwrap_or_else(|e| Err(Error::Invalid(format!("the machine API task died: {e}")))),
                    _ = sweep => Err(Error::Invalid("the Machine reachability sweep ended".into())),
                }
            }))
        }
        None => {
            tracing::warn!("no machine API URL given: machines cannot enroll with this operator");
            None
        }
    };
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
    let pools = Arc::new(crate::machines::pool::Context {
        client: ctx.client.clone(),
        namespace: namespace.into(),
        store: crate::machines::store::Store::new()?,
        ntp: node_defaults.0,
        dns: node_defaults.1,
    });
    // Both controllers stop on SIGINT/SIGTERM; the operator runs until both have.
    let controllers =
        futures::future::join(controller::run(ctx), crate::machines::pool::run(pools));
    let Some(mut api_task) = api_task else {
        controllers.await;
        return Ok(());
    };
    tokio::select! {
        _ = controllers => {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut api_task).await;
            Ok(())
        }
        ended = &mut api_task => match ended {
            Ok(Ok(())) => Err(Error::Invalid("the machine API stopped".into())),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Invalid(format!("the machine API task died: {e}"))),
        },
    }
}

/// `tether-operator run`: the operator against the cluster of the ambient kubeconfig (or
/// in-cluster service account), for a real management cluster.
pub async fn run(
    data_dir: &Path,
    namespace: &str,
    kind: RuntimeKind,
    install_crds: bool,
    machine_api: Option<crate::machine_api::Settings>,
) -> Result<(), Error> {
    std::fs::create_dir_all(data_dir).map_err(Error::io("create", data_dir))?;
    let client = kube::Client::try_default()
        .await
        .map_err(Error::kube("connect to the cluster"))?;
    if install_crds {
        crate::crds::install(&client).await?;
    }
    let runtime = match kind {
        RuntimeKind::Process => {
            Runtime::Process(Arc::new(ProcessRuntime::new(data_dir, cache_resolver())?))
        }
        RuntimeKind::Kubernetes => Runtime::kubernetes(client.clone()),
    };
    let served = serve(client, runtime.clone(), namespace, data_dir, machine_api).await;
    runtime.shutdown().await;
    served
}

/// Writes step and reconcile timings every 2 s to `path` (for `cargo xtask bench cp`).
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
                    "steps_ms": m.steps.iter().map(|(k, v)| (k.clone(), json!(ms(v)))).collect::<serde_json::Map<_, _>>(),
                })
            };
            let _ = write_atomic(&path, json.to_string().as_bytes());
        }
    });
}
