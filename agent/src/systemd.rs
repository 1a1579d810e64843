//! A small client for systemd's manager over D-Bus (`org.freedesktop.systemd1`).
//!
//! The agent starts what it installs (containerd, kubelet) through systemd rather than
//! spawning processes itself, so systemd owns restart, ordering and logs. Starting a unit is
//! asynchronous in systemd: `StartUnit` returns a job, and the job's outcome arrives later as
//! a `JobRemoved` signal; [`Systemd::start_unit`] subscribes before starting so the signal
//! cannot be missed.

use std::time::Duration;

use futures::StreamExt;
use zbus::zvariant::OwnedObjectPath;

use crate::Error;

/// `org.freedesktop.systemd1.Manager`, the subset the agent uses.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    /// Enqueues a start job; returns the job's object path.
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    /// `RestartUnit(name, mode)`.
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    /// Enqueues a stop job; returns the job's object path.
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    /// Sends `signal` to the processes of `unit` (`who`: `main`, `control` or `all`).
    fn kill_unit(&self, name: &str, who: &str, signal: i32) -> zbus::Result<()>;
    /// Reloads unit files from disk (`systemctl daemon-reload`).
    fn reload(&self) -> zbus::Result<()>;
    /// Asks systemd to emit job and unit signals to this client.
    fn subscribe(&self) -> zbus::Result<()>;
    /// The object path of a loaded unit.
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Emitted when a job finishes; `result` is `done` on success.
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
    /// `initializing`, `starting`, `running`, `degraded`, `maintenance` or `stopping`.
    #[zbus(property)]
    fn system_state(&self) -> zbus::Result<String>;
}

/// `org.freedesktop.systemd1.Unit`, the subset the agent reads.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Unit {
    /// `active`, `inactive`, `failed`, `activating`, ….
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    /// Finer state, e.g. `running` or `exited`.
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
}

/// A connection to one systemd instance (the host's, or a container's in tests).
#[derive(Clone)]
pub struct Systemd {
    conn: zbus::Connection,
}

impl Systemd {
    /// Connects to the system bus at `/run/dbus/system_bus_socket`.
    pub async fn system() -> Result<Systemd, Error> {
        let conn = zbus::Connection::system()
            .await
            .map_err(|source| Error::Systemd {
                action: "connect to the system bus".into(),
                source: Box::new(source),
            })?;
        Ok(Systemd { conn })
    }

    /// Uses an existing connection (e.g. to a bus socket at a non-default path).
    pub fn from_connection(conn: zbus::Connection) -> Systemd {
        Systemd { conn }
    }

    async fn manager(&self) -> Result<ManagerProxy<'_>, Error> {
        ManagerProxy::new(&self.conn)
            .await
            .map_err(|source| Error::Systemd {
                action: "create manager proxy".into(),
                source: Box::new(source),
            })
    }

    /// The manager's overall state (`running` once boot finished cleanly).
    pub async fn system_state(&self) -> Result<String, Error> {
        self.manager()
            .await?
            .system_state()
            .await
            .map_err(|source| Error::Systemd {
                action: "read SystemState".into(),
                source: Box::new(source),
            })
    }

    /// Reloads unit files (after the agent wrote or changed some).
    pub async fn reload(&self) -> Result<(), Error> {
        self.manager()
            .await?
            .reload()
            .await
            .map_err(|source| Error::Systemd {
                action: "reload unit files".into(),
                source: Box::new(source),
            })
    }

    /// Starts `unit` (mode `replace`) and waits until its job is finished; fails unless the
    /// job's result is `done`.
    pub async fn start_unit(&self, unit: &str, timeout: Duration) -> Result<(), Error> {
        self.job(unit, Job::Start, timeout).await
    }

    /// Restarts `unit` (starts it if it is not running), waiting as [`Systemd::start_unit`]
    /// does: for a unit whose configuration the agent just changed.
    pub async fn restart_unit(&self, unit: &str, timeout: Duration) -> Result<(), Error> {
        self.job(unit, Job::Restart, timeout).await
    }

    /// Stops `unit` and waits for the job; a unit systemd does not know is stopped already.
    pub async fn stop_unit(&self, unit: &str, timeout: Duration) -> Result<(), Error> {
        match self.job(unit, Job::Stop, timeout).await {
            Err(Error::Systemd { source, .. }) if no_such_unit(&source) => Ok(()),
            other => other,
        }
    }

    /// SIGKILLs every process left in `unit`'s cgroup (after a stop with `KillMode=process`
    /// leaves containerd's shims behind); nothing to kill is fine.
    pub async fn kill_all(&self, unit: &str) -> Result<(), Error> {
        match self.manager().await?.kill_unit(unit, "all", 9).await {
            Ok(()) => Ok(()),
            Err(e) if no_such_unit(&e) => Ok(()),
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchProcess" =>
            {
                Ok(())
            }
            Err(source) => Err(Error::Systemd {
                action: format!("kill the processes of {unit}"),
                source: Box::new(source),
            }),
        }
    }

    async fn job(&self, unit: &str, kind: Job, timeout: Duration) -> Result<(), Error> {
        let manager = self.manager().await?;
        let err = |action: &str| {
            let action = format!("{action} {unit}");
            move |source| Error::Systemd {
                action,
                source: Box::new(source),
            }
        };
        match manager.subscribe().await {
            // systemd keeps one subscription per connection; a second request is harmless.
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" => {}
            other => other.map_err(err("subscribe before starting"))?,
        }
        let mut removed = manager
            .receive_job_removed()
            .await
            .map_err(err("watch jobs of"))?;
        let job = match kind {
            Job::Start => manager.start_unit(unit, "replace").await,
            Job::Restart => manager.restart_unit(unit, "replace").await,
            Job::Stop => manager.stop_unit(unit, "replace").await,
        }
        .map_err(err(kind.verb()))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Ok(args.result.clone());
                }
            }
            Err(Error::Systemd {
                action: format!("wait for job of {unit}"),
                source: Box::new(zbus::Error::Failure("signal stream ended".into())),
            })
        };
        let result = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("the {} job of {unit}", kind.verb()),
                seconds: timeout.as_secs(),
            })??;
        if result == "done" {
            Ok(())
        } else {
            Err(Error::JobFailed {
                unit: unit.to_string(),
                result,
            })
        }
    }

    /// The unit's `ActiveState`.
    pub async fn active_state(&self, unit: &str) -> Result<String, Error> {
        let err = |action: &str| {
            let action = format!("{action} {unit}");
            move |source| Error::Systemd {
                action,
                source: Box::new(source),
            }
        };
        let path = self
            .manager()
            .await?
            .get_unit(unit)
            .await
            .map_err(err("get"))?;
        let proxy = UnitProxy::builder(&self.conn)
            .path(path)
            .map_err(err("address"))?
            .build()
            .await
            .map_err(err("proxy for"))?;
        proxy
            .active_state()
            .await
            .map_err(err("read ActiveState of"))
    }
}

/// A job the agent asks systemd for.
#[derive(Debug, Clone, Copy)]
enum Job {
    Start,
    Restart,
    Stop,
}

/// Whether systemd answered that it knows no such unit.
fn no_such_unit(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, _, _)
        if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit")
}

impl Job {
    fn verb(self) -> &'static str {
        match self {
            Job::Start => "start",
            Job::Restart => "restart",
            Job::Stop => "stop",
        }
    }
}
