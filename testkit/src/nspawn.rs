//! Booting a root filesystem with real systemd under `systemd-nspawn`, optionally inside a
//! [`NetNs`], and talking to its systemd over its own D-Bus system bus.
//!
//! The container runs with `--volatile=overlay` (a tmpfs over the tree), so the cached root
//! filesystem is never modified and many containers can boot from one tree. The host reaches
//! the container's bus through `/proc/<container init>/root/run/dbus/system_bus_socket`: no
//! socket is shared by bind mount, and the peer credentials dbus-daemon checks are the
//! host's root, which is the container's root too (no user namespace).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_agent::systemd::Systemd;

use crate::netns::NetNs;
use crate::process::Process;
use crate::rootfs::which;
use crate::{Error, Result};

/// How long a container may take to reach a running system.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// A host path made visible inside the container.
#[derive(Debug, Clone)]
pub struct Bind {
    /// Path on the host.
    pub host: PathBuf,
    /// Path inside the container.
    pub container: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

/// How to boot a container.
#[derive(Debug, Default)]
pub struct ContainerOptions<'a> {
    /// Join this network namespace (else the container shares the host's network).
    pub netns: Option<&'a NetNs>,
    /// Extra bind mounts.
    pub binds: Vec<Bind>,
    /// Boot it to run a kubelet (docs/decisions.md "A node joined by hand"): `/dev/kmsg`,
    /// all capabilities, the keyring system calls runc makes, and `/proc/sys` and — on a
    /// cgroup v1 host — its cgroup controllers remounted read-write.
    /// Test nodes only: such a container can reach the host's kernel settings.
    pub kubernetes_node: bool,
}

/// A booted container; powered off (then killed) on drop.
pub struct Container {
    name: String,
    leader: u32,
    systemd: Systemd,
    process: Process,
    _dir: tempfile::TempDir,
}

impl Container {
    /// Boots `rootfs` and returns once its systemd reports `running` (or `degraded`) over
    /// D-Bus.
    pub async fn boot(rootfs: &Path, options: ContainerOptions<'_>) -> Result<Container> {
        let nspawn = which("systemd-nspawn", "install systemd-container")?;
        let dir = crate::test_dir("tether-nspawn-")?;
        let name = format!(
            "tt{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.rsplit('-').next().unwrap_or(n).to_lowercase())
                .unwrap_or_default()
        );
        let mut cmd = Command::new(nspawn);
        cmd.arg(format!("--directory={}", rootfs.display()))
            .arg("--boot")
            .arg("--register=no")
            .arg("--keep-unit")
            .arg("--volatile=overlay")
            .arg("--console=pipe")
            .arg(format!("--machine={name}"));
        if let Some(ns) = options.netns {
            // The namespace is the container's own: let its systemd-networkd configure it
            // (nspawn grants CAP_NET_ADMIN with --private-network, not with a given path).
            cmd.arg(format!("--network-namespace-path={}", ns.path().display()))
                .arg("--capability=CAP_NET_ADMIN");
        }
        if options.kubernetes_node {
            cmd.arg("--bind=/dev/kmsg")
                .arg("--capability=all")
                .arg("--system-call-filter=@keyring");
        }
        for b in &options.binds {
            let flag = if b.read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!(
                "{flag}={}:{}",
                b.host.display(),
                b.container.display()
            ));
        }
        let mut process = Process::spawn(&name, cmd, &dir.path().join("console.log"))?;
        let start = Instant::now();
        let mut last = String::from("container init not found");
        let (leader, systemd) = loop {
            process.check_running()?;
            if start.elapsed() > BOOT_TIMEOUT {
                return Err(Error::NotReady {
                    component: format!("container {name}"),
                    seconds: BOOT_TIMEOUT.as_secs(),
                    reason: last,
                    log_tail: process.log_tail(40),
                });
            }
            if let Some(leader) = container_init(process.pid()) {
                match connect(leader).await {
                    Ok(systemd) => match systemd.system_state().await {
                        Ok(s) if s == "running" || s == "degraded" => break (leader, systemd),
                        Ok(s) => last = format!("systemd state {s}"),
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if options.kubernetes_node {
            remount_for_kubelet(leader)?;
        }
        tracing::debug!(container = name, elapsed = ?start.elapsed(), "booted");
        Ok(Container {
            name,
            leader,
            systemd,
            process,
            _dir: dir,
        })
    }

    /// The container's machine name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host pid of the container's init (its PID 1).
    pub fn leader_pid(&self) -> u32 {
        self.leader
    }

    /// The container's systemd, over its system bus.
    pub fn systemd(&self) -> &Systemd {
        &self.systemd
    }

    /// A path inside the container as seen from the host (through its init's root).
    pub fn path(&self, inside: impl AsRef<Path>) -> PathBuf {
        let inside = inside.as_ref();
        let rel = inside.strip_prefix("/").unwrap_or(inside);
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(rel)
    }

    /// Writes a file inside the container (into its volatile overlay).
    pub fn write_file(&self, inside: impl AsRef<Path>, contents: &str) -> Result<()> {
        let path = self.path(inside);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
        }
        fs::write(&path, contents).map_err(Error::io("write", &path))
    }

    /// The console output so far (what nspawn's pipe carried: systemd's own lines; units
    /// writing to `/dev/console` do not reach it — see [`Container::journal`]).
    pub fn console_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The last `lines` journal lines of `unit` inside the container (`journalctl` run in
    /// the container's namespaces), or what went wrong reading them.
    pub fn journal(&self, unit: &str, lines: usize) -> String {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &self.leader.to_string(),
                "-a",
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
            ])
            .args(["-u", unit, "-n", &lines.to_string()])
            .output();
        match out {
            Ok(o) => {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            }
            Err(e) => format!("(journalctl in the container: {e})"),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM makes nspawn power the container off cleanly; the process guard then kills
        // the group. The init is killed explicitly in case nspawn died first.
        self.process.stop(Duration::from_secs(10));
        if container_init_alive(self.leader) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.leader as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Makes read-write what the kubelet writes and nspawn mounts read-only: `/proc/sys` (its
/// kernel tunables) and, on a cgroup v1 host, the controllers it creates `kubepods` in.
/// Only these: with all of `/sys` writable (`SYSTEMD_NSPAWN_API_VFS_WRITABLE`) the
/// container's networkd waits for a udev that never initialises its links, and the node
/// never gets an address.
fn remount_for_kubelet(leader: u32) -> Result<()> {
    let file = format!("/proc/{leader}/mountinfo");
    let info = fs::read_to_string(&file).map_err(Error::io("read", &file))?;
    let mut targets = v1_controllers_read_only(&info);
    targets.push("/proc/sys");
    for mount_point in targets {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &leader.to_string(),
                "-m",
                "mount",
                "-o",
                "remount,rw,bind",
            ])
            .arg(mount_point)
            .output()
            .map_err(Error::io("run", "nsenter"))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("remount {mount_point} read-write in the container"),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    Ok(())
}

/// Mount points of read-only cgroup v1 hierarchies under `/sys/fs/cgroup` in `mountinfo`.
fn v1_controllers_read_only(mountinfo: &str) -> Vec<&str> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let (mount_point, options) = (*f.get(4)?, *f.get(5)?);
            let fstype = right.split(' ').next()?;
            (fstype == "cgroup"
                && mount_point.starts_with("/sys/fs/cgroup/")
                && options.split(',').any(|o| o == "ro"))
            .then_some(mount_point)
        })
        .collect()
}

async fn connect(leader: u32) -> Result<Systemd, String> {
    let address = format!("unix:path=/proc/{leader}/root/run/dbus/system_bus_socket");
    let conn = zbus::connection::Builder::address(address.as_str())
        .map_err(|e| e.to_string())?
        .build()
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    Ok(Systemd::from_connection(conn))
}

fn container_init_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| ns_pid_is_one(&s))
        .unwrap_or(false)
}

/// The descendant of `nspawn_pid` that is PID 1 of its own pid namespace.
fn container_init(nspawn_pid: u32) -> Option<u32> {
    let mut statuses: HashMap<u32, String> = HashMap::new();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(s) = fs::read_to_string(entry.path().join("status")) {
            statuses.insert(pid, s);
        }
    }
    let parent_of = |s: &str| -> Option<u32> {
        s.lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    };
    let mut frontier = vec![nspawn_pid];
    while let Some(p) = frontier.pop() {
        for (pid, status) in &statuses {
            if parent_of(status) == Some(p) {
                if ns_pid_is_one(status) {
                    return Some(*pid);
                }
                frontier.push(*pid);
            }
        }
    }
    None
}

/// Whether a `/proc/<pid>/status` text says the process is PID 1 of a nested pid namespace.
fn ns_pid_is_one(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            let ids: Vec<&str> = v.split_whitespace().collect();
            ids.len() >= 2 && ids.last() == Some(&"1")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::{ns_pid_is_one, v1_controllers_read_only};

    #[test]
    fn read_only_v1_controllers() {
        // From an nspawn container on this hybrid host.
        let info = "\
44 105 0:46 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:15 - tmpfs tmpfs ro,size=4096k
45 44 0:29 / /sys/fs/cgroup/cpu ro,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu
51 44 0:32 /process_api/d1 /sys/fs/cgroup/memory ro,nosuid,relatime shared:22 - cgroup cgroup rw,memory
52 44 0:36 / /sys/fs/cgroup/pids rw,nosuid,relatime shared:23 - cgroup cgroup rw,pids
53 44 0:38 /payload /sys/fs/cgroup/unified rw,nosuid,nodev shared:24 - cgroup2 cgroup rw
54 44 0:37 /payload /sys/fs/cgroup/systemd rw,nosuid,nodev shared:25 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            v1_controllers_read_only(info),
            ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory"]
        );
        assert!(
            v1_controllers_read_only("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
                .is_empty()
        );
    }

    #[test]
    fn nested_pid_one() {
        assert!(ns_pid_is_one("Name:\tsystemd\nNSpid:\t23745\t1\n"));
        assert!(!ns_pid_is_one("NSpid:\t1\n"));
        assert!(!ns_pid_is_one("NSpid:\t23762\t17\n"));
        assert!(!ns_pid_is_one("Name: x\n"));
    }
}
