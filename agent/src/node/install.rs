//! Install and join: converges the node to a desired [`Join`] (or, with none, to a node with
//! nothing of any tenant), one named [`Step`] after the other. Every step is idempotent —
//! a file is rewritten only when its bytes differ, a verified binary is not fetched again,
//! a unit is restarted only when what it reads changed — so an agent killed at any point
//! converges on its next run without duplicating anything.
//!
//! Each step is logged as `node step=<Name>` before it runs; the kill tests read that, and
//! the enrollment's test hook (`TETHER_AGENT_PHASE_PAUSE_MS`, [`crate::enroll::PAUSE_ENV`])
//! pauses after each announcement here too, so a killer can land inside a step.
//!
//! The status the agent reports ([`Progress`]) follows: `Installing` from the first write,
//! `Joining` once the kubelet runs, `Ready` when the Node is; a failure is `Failed` with a
//! `NodeInstalled=False` condition saying why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_api::machine::{MachinePhase, NODE_INSTALLED};
use tether_api::machine_api::Join;
use tether_api::tenant_control_plane::Condition;
use tokio::sync::watch;

use super::download::{self, Outcome, Want};
use super::plan::{self, Host};
use super::verified::Verified;
use super::{Layout, own_node, routes, wipe};
use crate::error::{Error, Result};
use crate::systemd::Systemd;

/// How long a unit job may take.
const UNIT_TIMEOUT: Duration = Duration::from_secs(90);

/// The named steps of install and join, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The tenant marker: from here on the node holds something of the tenant.
    Marker,
    /// The runtime binaries from the store, by digest.
    Download,
    /// containerd's and the kubelet's files and units.
    Configure,
    /// containerd (re)started.
    Containerd,
    /// The baked pause image imported.
    Pause,
    /// The kubelet (re)started.
    Kubelet,
    /// Waiting for the kubelet's client certificate (TLS bootstrap).
    Certificate,
    /// The CNI network from the Node's podCIDR and the host-gw routes.
    Network,
    /// Waiting for the Node to be Ready.
    Ready,
}

/// What the agent reports of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Enrolled (nothing installed), Installing, Joining, Ready or Failed.
    pub phase: Option<MachinePhase>,
    /// The tenant whose software is on the node.
    pub tenant: Option<String>,
    /// The node joins without a kubelet client certificate yet.
    pub needs_bootstrap_token: bool,
    /// `NodeInstalled`, once there is something to say.
    pub condition: Option<Condition>,
    /// The step the node is at (for logs and tests).
    pub step: Option<Step>,
}

/// Where the node stands after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converged {
    /// Joined and Ready (or wiped clean, without a join).
    Done,
    /// Waiting on the tenant (a certificate, a podCIDR, Readiness): look again soon.
    Waiting(String),
}

/// The node's installer.
pub struct Installer {
    /// `/` on a node; a tree in tests.
    pub root: PathBuf,
    /// Where things go.
    pub layout: Layout,
    /// What the node is.
    pub host: Host,
    /// systemd.
    pub systemd: Systemd,
    /// The store client.
    pub http: reqwest::Client,
    /// What the agent reports.
    pub progress: watch::Sender<Progress>,
    /// Files this process verified by digest.
    pub verified: Verified,
    /// The sandbox image this process last saw in containerd: a pass does not run `ctr`
    /// again (1–2 s of a TCG vCPU on every pass while the node waits on the tenant).
    /// Forgotten when containerd is restarted and when the node is wiped.
    pub sandbox_seen: std::sync::Mutex<Option<String>>,
}

impl Installer {
    fn path(&self, p: &str) -> PathBuf {
        crate::inputs::under(&self.root, p)
    }

    async fn at(&self, step: Step) {
        tracing::info!("node step={step:?}");
        self.progress.send_modify(|p| p.step = Some(step));
        if let Some(ms) = std::env::var(crate::enroll::PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// One pass towards `join` (or towards a clean node without one).
    pub async fn converge(&self, join: Option<&Join>) -> Result<Converged> {
        let marker = std::fs::read_to_string(self.path(plan::TENANT_MARKER)).ok();
        let held = marker.as_deref().map(str::trim).filter(|t| !t.is_empty());
        let Some(join) = join else {
            if held.is_some() {
                self.wipe().await?;
            }
            self.progress.send_modify(|p| {
                *p = Progress {
                    phase: Some(MachinePhase::Enrolled),
                    ..Default::default()
                }
            });
            return Ok(Converged::Done);
        };
        if let Some(other) = held.filter(|t| *t != join.tenant) {
            tracing::warn!(%other, "the node holds another tenant's software: wiping it first");
            self.wipe().await?;
        }
        match self.install(join).await {
            Ok(c) => Ok(c),
            Err(e) => {
                let reason = match &e {
                    Error::DigestMismatch { .. } => "DigestMismatch",
                    Error::Download { .. } => "DownloadFailed",
                    Error::NoSpace { .. } => "NoSpace",
                    _ => "InstallFailed",
                };
                self.progress.send_modify(|p| {
                    p.phase = Some(MachinePhase::Failed);
                    p.condition = Some(node_condition(false, reason, &e.to_string()));
                });
                Err(e)
            }
        }
    }

    async fn install(&self, join: &Join) -> Result<Converged> {
        let has_cert = self.path(&plan::client_cert_path(&self.layout)).exists();
        self.at(Step::Marker).await;
        self.progress.send_modify(|p| {
            p.tenant = Some(join.tenant.clone());
            p.needs_bootstrap_token = !has_cert;
            // A pass over an installed node does not go back to Installing.
            if !matches!(p.phase, Some(MachinePhase::Joining | MachinePhase::Ready)) {
                p.phase = Some(MachinePhase::Installing);
            }
        });
        let files = plan::files(&self.layout, join, self.host);
        let (marker, rest) = files.split_first().expect("the marker is first");
        self.write(marker)?;

        self.at(Step::Download).await;
        self.download(join).await?;

        self.at(Step::Configure).await;
        let mut changed = Vec::new();
        for f in rest {
            if self.write(f)? {
                changed.push(f.path.clone());
            }
        }
        let (restart_containerd, restart_kubelet) = plan::restarts(&self.layout, &changed);
        if changed.iter().any(|p| p.starts_with(plan::UNIT_DIR)) {
            self.systemd.reload().await?;
        }
        for unit in plan::system_restarts(&changed) {
            self.systemd.restart_unit(unit, UNIT_TIMEOUT).await?;
        }

        self.at(Step::Containerd).await;
        if self
            .ensure_running(plan::CONTAINERD_UNIT, restart_containerd)
            .await?
        {
            self.set_sandbox_seen(None);
        }

        self.at(Step::Pause).await;
        self.import_pause(join).await?;

        self.at(Step::Kubelet).await;
        self.ensure_running(plan::KUBELET_UNIT, restart_kubelet)
            .await?;
        self.progress.send_modify(|p| {
            if p.phase != Some(MachinePhase::Ready) {
                p.phase = Some(MachinePhase::Joining);
            }
            p.condition = Some(node_condition(
                true,
                "Installed",
                "containerd and the kubelet run",
            ));
        });

        self.at(Step::Certificate).await;
        let cert = self.path(&plan::client_cert_path(&self.layout));
        let Ok(client_pem) = std::fs::read_to_string(&cert) else {
            return Ok(Converged::Waiting(
                "the kubelet's client certificate".into(),
            ));
        };
        self.progress
            .send_modify(|p| p.needs_bootstrap_token = false);

        self.at(Step::Network).await;
        let node = own_node::read(&join.api_server, &join.ca, &client_pem, &join.node_name).await?;
        let Some(node) = node else {
            return Ok(Converged::Waiting("the Node to be registered".into()));
        };
        let Some(cidr) = &node.pod_cidr else {
            return Ok(Converged::Waiting("the Node's podCIDR".into()));
        };
        self.write(&plan::cni_file(&self.layout, cidr))?;
        routes::converge(&join.routes).await?;

        self.at(Step::Ready).await;
        if !node.ready {
            self.progress
                .send_modify(|p| p.phase = Some(MachinePhase::Joining));
            return Ok(Converged::Waiting("the Node to be Ready".into()));
        }
        self.progress
            .send_modify(|p| p.phase = Some(MachinePhase::Ready));
        Ok(Converged::Done)
    }

    /// Removes everything of the tenant, and what this process remembers of it.
    async fn wipe(&self) -> Result<()> {
        self.verified.clear();
        self.set_sandbox_seen(None);
        wipe::wipe(&self.root, &self.layout, &self.systemd).await
    }

    fn sandbox_seen(&self) -> Option<String> {
        self.sandbox_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_sandbox_seen(&self, image: Option<String>) {
        *self.sandbox_seen.lock().unwrap_or_else(|e| e.into_inner()) = image;
    }

    /// Writes `f` when its bytes differ; whether it did.
    fn write(&self, f: &plan::File) -> Result<bool> {
        let path = self.path(&f.path);
        if std::fs::read(&path).is_ok_and(|b| b == f.contents.as_bytes()) {
            return Ok(false);
        }
        crate::fs::write_atomic(&path, f.contents.as_bytes(), f.mode)?;
        Ok(true)
    }

    async fn download(&self, join: &Join) -> Result<()> {
        for a in &join.artifacts {
            let dest = self.path(&plan::artifact_path(&self.layout, a));
            let want = Want {
                url: &a.url,
                sha256: &a.sha256,
                size: a.size,
            };
            match download::fetch_verified(&self.http, &want, &dest, &self.verified).await? {
                Outcome::AlreadyPresent => {}
                Outcome::Downloaded {
                    fetched,
                    resumed_from,
                } => {
                    tracing::info!(name = %a.name, version = %a.version, fetched, resumed_from, "installed")
                }
            }
        }
        Ok(())
    }

    /// Starts `unit` when it is not running, restarts it when `restart`; whether it did.
    async fn ensure_running(&self, unit: &str, restart: bool) -> Result<bool> {
        let active = self.systemd.active_state(unit).await.unwrap_or_default() == "active";
        if restart || !active {
            tracing::info!(unit, restart, "starting");
            self.systemd.restart_unit(unit, UNIT_TIMEOUT).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Imports the image's baked pause archive into containerd's CRI namespace, unless the
    /// sandbox image is there already; an image without the archive pulls it instead.
    async fn import_pause(&self, join: &Join) -> Result<()> {
        let archive = self.path(plan::PAUSE_ARCHIVE);
        if !archive.exists() {
            return Ok(());
        }
        let image = &join.containerd.sandbox_image;
        if self.sandbox_seen().as_ref() == Some(image) {
            return Ok(());
        }
        let ctr = self.path(&self.layout.bin("ctr"));
        let name = format!("name=={image}");
        let present = || async {
            let listed = super::run(&ctr, &["-n", "k8s.io", "images", "ls", "-q", &name]).await?;
            Ok::<_, Error>(String::from_utf8_lossy(&listed).trim() == image)
        };
        if !present().await? {
            let archive = archive.to_string_lossy().into_owned();
            super::run(&ctr, &["-n", "k8s.io", "images", "import", &archive]).await?;
            if !present().await? {
                // An image whose baked archive is another tag than the tenant asks for:
                // the kubelet pulls the sandbox image instead.
                tracing::warn!(image = %image, "the baked pause archive does not hold the sandbox image");
                return Ok(());
            }
            tracing::info!(image = %image, "pause imported from the image");
        }
        self.set_sandbox_seen(Some(image.clone()));
        Ok(())
    }
}

/// What the node under `root` is: a container (systemd's marker) on a cgroup v1 host (no
/// unified hierarchy at `/sys/fs/cgroup`) needs the kubelet's and containerd's allowances.
pub fn detect_host(root: &Path) -> Host {
    let unified = crate::inputs::under(root, "/sys/fs/cgroup/cgroup.controllers").exists();
    Host {
        container_on_cgroup_v1: crate::facts::in_container(root) && !unified,
    }
}

/// The `NodeInstalled` condition.
pub fn node_condition(ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: NODE_INSTALLED.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        ..Default::default()
    }
}
