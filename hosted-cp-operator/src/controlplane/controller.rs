//! The TenantControlPlane controller, kube-rs style: `reconcile` + `error_policy` + a
//! shared [`Context`], with a finalizer so deletion tears down what apply made. The work
//! itself is the ordered step pipeline in [`super::pipeline`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ResourceExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;
use tether_api::TenantControlPlane;

use super::pipeline::{self, Tenant};
use super::runtime::Runtime;
use crate::error::Error;

/// The finalizer on every TenantControlPlane.
pub const FINALIZER: &str = "tether.dev/control-plane";

/// Step durations, for `cargo xtask bench cp` (`metrics.json`) and logs.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Step name → durations of the latest runs (at most [`Metrics::KEEP`]).
    pub steps: BTreeMap<String, Vec<Duration>>,
    /// Latest full reconcile durations (at most [`Metrics::KEEP`]).
    pub reconciles: Vec<Duration>,
}

impl Metrics {
    /// Samples kept per series: every Ready tenant reconciles every 10 s, so unbounded
    /// series would grow without end (and `metrics.json`, rewritten every 2 s, with them).
    pub const KEEP: usize = 4096;

    /// Appends `d`, dropping the oldest quarter once [`Metrics::KEEP`] is reached.
    pub fn push(series: &mut Vec<Duration>, d: Duration) {
        if series.len() >= Self::KEEP {
            series.drain(..Self::KEEP / 4);
        }
        series.push(d);
    }
}

/// Shared state of the controller.
pub struct Context {
    /// Management cluster client.
    pub client: kube::Client,
    /// Where tenants run.
    pub runtime: Runtime,
    /// The operator's namespace (DataStore credentials live there).
    pub namespace: String,
    /// Operator data dir (etcdctl credentials).
    pub data_dir: PathBuf,
    /// Kubernetes versions the operator can run.
    pub known_versions: Vec<String>,
    /// Step timings.
    pub metrics: Mutex<Metrics>,
    /// Publishes Events on TenantControlPlanes (refusals, so `kubectl describe` says why).
    pub recorder: kube::runtime::events::Recorder,
}

impl Context {
    /// Records that `step` took `d`.
    pub fn time(&self, step: &str, d: Duration) {
        tracing::debug!(step, ms = d.as_millis() as u64, "reconcile step");
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        Metrics::push(m.steps.entry(step.to_string()).or_default(), d);
    }
}

/// Runs the controller until the stream ends (the process is stopped).
pub async fn run(ctx: Arc<Context>) {
    let api: Api<TenantControlPlane> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(tcp: Arc<TenantControlPlane>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(tenant = %tcp.name_any(), "reconcile failed: {err}");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(tcp: Arc<TenantControlPlane>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = tcp.namespace().unwrap_or_else(|| "default".into());
    let api: Api<TenantControlPlane> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, tcp, |event| async {
        match event {
            Event::Apply(t) => pipeline::apply(Tenant::new(&t, &ctx)).await,
            Event::Cleanup(t) => pipeline::cleanup(Tenant::new(&t, &ctx)).await,
        }
    })
    .await
    .map_err(|e| Error::Invalid(format!("finalizer: {e}")));
    Metrics::push(
        &mut ctx
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reconciles,
        started.elapsed(),
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_stay_bounded() {
        let mut v = Vec::new();
        for i in 0..(Metrics::KEEP * 3) {
            Metrics::push(&mut v, Duration::from_millis(i as u64));
        }
        assert!(v.len() <= Metrics::KEEP);
        assert_eq!(
            v.last(),
            Some(&Duration::from_millis(Metrics::KEEP as u64 * 3 - 1))
        );
    }
}
