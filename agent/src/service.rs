//! `tether-agent run`: the service. Enroll if needed, then keep the machine's side of the
//! contract: long-poll the desired config, hand its join to the node task
//! ([`crate::node::install`], which converges the node to it), report status every
//! `reportSeconds` and at once when the node's progress changes, renew the certificate at two
//! thirds of its life. If the API stops accepting the certificate (the Machine was deleted),
//! the enrollment is forgotten and the agent enrolls again; the node keeps what it runs.
//!
//! Failures are retried with jittered exponential backoff; nothing here exits on a network
//! error. SIGTERM ends the loop.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tether_api::machine::MachinePhase;
use tether_api::machine_api::{Join, Reason, StatusReport};
use tokio::sync::watch;

use crate::api::MachineApi;
use crate::enroll;
use crate::error::{Error, Result};
use crate::identity::{self, Enrolled, Identity, StateDir};
use crate::node::install::{Converged, Installer, Progress};
use crate::node::{Layout, plan};
use crate::notify::Notifier;
use crate::tunnel;

/// Longest a config long-poll waits on the server.
pub const LONG_POLL: Duration = Duration::from_secs(30);
/// Status interval until the operator says otherwise.
const DEFAULT_REPORT: Duration = Duration::from_secs(15);

/// Where the service runs.
pub struct Service {
    /// `/` on a node; a tree in tests.
    pub root: PathBuf,
    /// The state directory.
    pub state: StateDir,
    /// systemd notifications.
    pub notify: Notifier,
}

/// Backoff: 1 s doubling to `cap`, with ±20 % jitter.
pub fn backoff(attempt: u32, cap: Duration) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(10)).min(cap);
    let jitter = (nanos() % 400) as f64 / 1000.0 + 0.8;
    base.mul_f64(jitter)
}

fn nanos() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// The node task's inputs and outputs: the latest desired join (`None` until the first
/// config arrives — a restarted agent must not wipe a node before it knows), and the
/// progress the reports carry.
struct NodeLink {
    join: watch::Sender<Option<Option<Join>>>,
    progress: watch::Receiver<Progress>,
    /// The tunnel the join asks for, and what it holds.
    tunnel: watch::Sender<Option<tunnel::Settings>>,
    tunnel_status: watch::Receiver<tunnel::Status>,
    drain: watch::Sender<bool>,
}

/// How long a stopping agent keeps serving the tunnel's open connections (`kubectl exec`,
/// `logs -f`) after telling the servers it is going; within the unit's `TimeoutStopSec`.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// On SIGTERM: tell every konnectivity-server this agent is going (one `DRAIN` per stream),
/// so new dials go to other agents, and keep serving what is open until it finishes or
/// [`DRAIN_GRACE`] ends — upstream's agent serves on after `DRAIN` until it is killed.
async fn drain(link: &NodeLink) {
    if link.tunnel_status.borrow().servers.is_empty() {
        return;
    }
    let _ = link.drain.send(true);
    let mut status = link.tunnel_status.clone();
    let done = tokio::time::timeout(
        DRAIN_GRACE,
        status.wait_for(|s| s.draining && s.drained >= s.servers.len() && s.open_connections == 0),
    )
    .await;
    let s = link.tunnel_status.borrow();
    tracing::info!(
        drained = s.drained,
        open = s.open_connections,
        within_grace = done.is_ok(),
        "tunnel: drained"
    );
}

/// Why the enrolled loop returned.
enum Exit {
    /// The certificate is no longer accepted: enroll again.
    Revoked(String),
}

impl Service {
    /// Runs until SIGTERM/SIGINT.
    pub async fn run(&self) -> Result<()> {
        self.notify.ready();
        // On the console too: systemd stops printing unit status there once a getty owns
        // it, so this line is how a person (or a test) at the serial console sees it.
        tracing::info!("ready: READY=1 sent to systemd");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(Error::io("install", "SIGTERM handler"))?;
        let link = self.start_node_task();
        tokio::select! {
            r = self.main_loop(&link) => r,
            _ = term.recv() => {
                self.notify.stopping();
                tracing::info!("SIGTERM: stopping");
                drain(&link).await;
                Ok(())
            }
            _ = tokio::signal::ctrl_c() => { self.notify.stopping(); drain(&link).await; Ok(()) }
        }
    }

    async fn main_loop(&self, link: &NodeLink) -> Result<()> {
        loop {
            let id = self.enrolled_identity().await;
            match self.serve(id, link).await {
                Exit::Revoked(why) => {
                    tracing::warn!(
                        "the machine API no longer accepts this machine's certificate ({why}); enrolling again"
                    );
                    self.state.forget()?;
                }
            }
        }
    }

    /// The saved identity, or a new one from enrollment (retried until it succeeds).
    async fn enrolled_identity(&self) -> Identity {
        let mut attempt = 0;
        loop {
            match self.state.load() {
                Ok(Some(id)) => {
                    tracing::info!(machine = %id.enrolled.machine, "enrolled identity found in {}", self.state.path().display());
                    return id;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("reading the state directory: {e}"),
            }
            self.notify.status("enrolling");
            match enroll::enroll(&self.root, &self.state, None, &self.notify).await {
                Ok(id) => return id,
                Err(e) => {
                    // Network trouble at boot clears in seconds: retry soon. A refusal needs a
                    // person (a new token, a fixed seed): retry rarely.
                    let cap = if e.retriable() {
                        Duration::from_secs(15)
                    } else {
                        Duration::from_secs(300)
                    };
                    let wait = backoff(attempt, cap);
                    tracing::error!(retry_in_s = wait.as_secs(), "enrollment failed: {e}");
                    self.notify.status(&format!("enrollment failed: {e}"));
                    self.notify.sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Starts the task that converges the node to the desired join.
    fn start_node_task(&self) -> NodeLink {
        let marker = std::fs::read_to_string(crate::inputs::under(&self.root, plan::TENANT_MARKER))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        // A restarted agent says at once what it holds and whether its kubelet still needs
        // a bootstrap token (so the token its pending CSR uses is not taken away).
        let has_cert =
            crate::inputs::under(&self.root, &plan::client_cert_path(&Layout::default())).exists();
        let (progress_tx, progress) = watch::channel(Progress {
            phase: marker.is_none().then_some(MachinePhase::Enrolled),
            needs_bootstrap_token: marker.is_some() && !has_cert,
            tenant: marker,
            ..Default::default()
        });
        let (join, join_rx) = watch::channel(None);
        let root = self.root.clone();
        tokio::spawn(node_loop(root, join_rx, progress_tx));
        let (tunnel, tunnel_rx) = watch::channel(None);
        let (status_tx, tunnel_status) = watch::channel(tunnel::Status::default());
        let (drain, drain_rx) = watch::channel(false);
        tokio::spawn(tunnel::run(tunnel_rx, status_tx, drain_rx));
        NodeLink {
            join,
            progress,
            tunnel,
            tunnel_status,
            drain,
        }
    }

    /// The enrolled loop: long-poll, report, renew.
    async fn serve(&self, mut id: Identity, link: &NodeLink) -> Exit {
        let mut progress = link.progress.clone();
        let mut tunnel_status = link.tunnel_status.clone();
        let mut tunnel_reported = None;
        let machine = id.enrolled.machine.clone();
        let mut api = match MachineApi::mutual(&id.enrolled.api, &id) {
            Ok(a) => a,
            Err(e) => return Exit::Revoked(format!("cannot use the saved identity: {e}")),
        };
        self.notify.status(&format!("enrolled as {machine}"));
        let mut version: Option<String> = None;
        let mut report_every = DEFAULT_REPORT;
        let mut report_at = tokio::time::Instant::now();
        let mut failures = 0u32;
        let mut poll = Box::pin(poll_config(
            api.clone(),
            machine.clone(),
            None,
            Duration::ZERO,
        ));
        loop {
            let renew_in = id
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                r = &mut poll => {
                    match r {
                        Ok(config) => {
                            failures = 0;
                            if version.as_deref() != Some(config.version.as_str()) {
                                tracing::info!(version = %config.version, phase = ?config.phase, pool = ?config.pool, "desired config");
                            }
                            version = Some(config.version.clone());
                            link.join.send_if_modified(|j| {
                                let new = Some(config.join.clone());
                                let changed = *j != new;
                                *j = new;
                                changed
                            });
                            link.tunnel.send_if_modified(|t| {
                                let new = config.join.as_ref().and_then(tunnel::desired::settings);
                                let changed = *t != new;
                                *t = new;
                                changed
                            });
                            report_every = Duration::from_secs(config.report_seconds.max(1).into());
                            self.notify.beat();
                            poll = Box::pin(poll_config(api.clone(), machine.clone(), version.clone(), Duration::ZERO));
                        }
                        Err(e) => {
                            if let Some(why) = revoked(&e) { return Exit::Revoked(why); }
                            let wait = backoff(failures, Duration::from_secs(30));
                            failures += 1;
                            tracing::warn!(retry_in_s = wait.as_secs(), "config long-poll: {e}");
                            self.notify.beat();
                            poll = Box::pin(poll_config(api.clone(), machine.clone(), version.clone(), wait));
                        }
                    }
                }
                Ok(()) = progress.changed() => {
                    // Report a step of the node now, not at the next interval.
                    report_at = tokio::time::Instant::now();
                }
                Ok(()) = tunnel_status.changed() => {
                    // Report the tunnel going up or down now; its error text waits.
                    let c = tunnel::desired::condition(link.tunnel.borrow().as_ref(), &tunnel_status.borrow_and_update());
                    let now = Some((c.status, c.reason));
                    if now != tunnel_reported {
                        tunnel_reported = now;
                        report_at = tokio::time::Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(report_at) => {
                    self.notify.beat();
                    let report = self.report(&progress.borrow_and_update(), link);
                    match api.status(&machine, &report).await {
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(why) = revoked(&e) { return Exit::Revoked(why); }
                            tracing::warn!("status report: {e}");
                        }
                    }
                    report_at = tokio::time::Instant::now() + report_every;
                }
                _ = tokio::time::sleep(renew_in) => {
                    match self.renew(&api, &id).await {
                        Ok(new) => {
                            tracing::info!(not_after = ?new.not_after, "machine certificate renewed");
                            id = new;
                            match MachineApi::mutual(&id.enrolled.api, &id) {
                                Ok(a) => api = a,
                                Err(e) => return Exit::Revoked(format!("cannot use the renewed identity: {e}")),
                            }
                            poll = Box::pin(poll_config(api.clone(), machine.clone(), version.clone(), Duration::ZERO));
                        }
                        Err(e) => {
                            if let Some(why) = revoked(&e) { return Exit::Revoked(why); }
                            tracing::warn!("certificate renewal: {e}; retrying in 30 s");
                            self.notify.sleep(Duration::from_secs(30)).await;
                        }
                    }
                }
            }
        }
    }

    fn report(&self, p: &Progress, link: &NodeLink) -> StatusReport {
        let mut conditions: Vec<_> = p.condition.iter().cloned().collect();
        conditions.push(tunnel::desired::condition(
            link.tunnel.borrow().as_ref(),
            &link.tunnel_status.borrow(),
        ));
        StatusReport {
            phase: p.phase,
            tenant: p.tenant.clone(),
            needs_bootstrap_token: p.needs_bootstrap_token,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            image_version: image_version(&self.root),
            boot_slot: crate::inputs::boot_params(&self.root)
                .ok()
                .and_then(|b| b.slot)
                .map(|s| s.to_string()),
            conditions,
        }
    }

    /// A new key and certificate; the old key stays until the new certificate is saved.
    async fn renew(&self, api: &MachineApi, id: &Identity) -> Result<Identity> {
        let key = self.state.next_key()?;
        let resp = api
            .renew(&id.enrolled.machine, identity::csr(&key)?)
            .await?;
        self.state.save(
            &Enrolled {
                api: id.enrolled.api.clone(),
                machine: resp.machine,
                certificate: resp.certificate,
                ca: resp.ca,
                received: 0,
            },
            &key,
        )
    }
}

/// The node task: converges the node to the latest desired join, pass after pass — soon
/// again while it waits on the tenant, with backoff after a failure, and every
/// [`SETTLED_CHECK`] once done (a Node can stop being Ready; a route can go).
async fn node_loop(
    root: PathBuf,
    mut join: watch::Receiver<Option<Option<Join>>>,
    progress: watch::Sender<Progress>,
) {
    let mut failures = 0u32;
    let mut installer: Option<Installer> = None;
    loop {
        let want = join.borrow_and_update().clone();
        let wait = match want {
            None => None,
            Some(want) => {
                if installer.is_none() {
                    installer = new_installer(&root, &progress).await;
                }
                match &installer {
                    None => Some(backoff(failures, Duration::from_secs(30))),
                    Some(i) => match i.converge(want.as_ref()).await {
                        Ok(Converged::Done) => {
                            failures = 0;
                            Some(SETTLED_CHECK)
                        }
                        Ok(Converged::Waiting(what)) => {
                            failures = 0;
                            tracing::debug!("node: waiting for {what}");
                            Some(Duration::from_secs(1))
                        }
                        Err(e) => {
                            let wait = backoff(failures, Duration::from_secs(30));
                            failures += 1;
                            tracing::error!(retry_in_s = wait.as_secs(), "node: {e}");
                            Some(wait)
                        }
                    },
                }
            }
        };
        match wait {
            None => {
                if join.changed().await.is_err() {
                    return;
                }
            }
            Some(d) => {
                tokio::select! {
                    r = join.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}

/// How often a joined node is checked again.
const SETTLED_CHECK: Duration = Duration::from_secs(10);

async fn new_installer(
    root: &std::path::Path,
    progress: &watch::Sender<Progress>,
) -> Option<Installer> {
    let systemd = match crate::systemd::Systemd::system().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("node: {e}");
            return None;
        }
    };
    let http = match crate::node::download::client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("node: {e}");
            return None;
        }
    };
    Some(Installer {
        root: root.to_path_buf(),
        layout: Layout::default(),
        host: crate::node::install::detect_host(root),
        systemd,
        http,
        progress: progress.clone(),
        verified: Default::default(),
        sandbox_seen: Default::default(),
    })
}

/// One long-poll, after waiting `delay` (the backoff after a failure).
async fn poll_config(
    api: MachineApi,
    machine: String,
    known: Option<String>,
    delay: Duration,
) -> Result<tether_api::machine_api::DesiredConfig> {
    tokio::time::sleep(delay).await;
    api.config(&machine, known.as_deref(), LONG_POLL).await
}

/// A refusal that means this identity is over.
fn revoked(e: &Error) -> Option<String> {
    match e {
        Error::Refused { error, .. }
            if matches!(
                error.reason,
                Reason::Forbidden | Reason::CertificateRequired
            ) =>
        {
            Some(error.to_string())
        }
        _ => None,
    }
}

/// The image version baked into the rootfs by tether-image.
pub fn image_version(root: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(crate::inputs::under(
        root,
        tether_boot::manifest::IMAGE_VERSION_PATH,
    ))
    .ok()
    .map(|s| s.trim().to_string())
    .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        for attempt in 0..20 {
            let d = backoff(attempt, Duration::from_secs(60));
            let base = Duration::from_secs(1u64 << attempt.min(10)).min(Duration::from_secs(60));
            assert!(
                d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2),
                "{attempt}: {d:?}"
            );
        }
    }
}
