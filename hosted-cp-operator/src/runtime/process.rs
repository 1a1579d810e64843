//! The `process` runtime: each component a supervised child process of the operator.
//!
//! Layout under the data dir: `tenants/<ns>.<name>/` is every component's working
//! directory (the files of [`crate::render`] are written there with mode 0600),
//! `logs/<component>.log` collects its output, `run/<component>.pid` records
//! `<pid> <start time>` of the running child, and `ports.json` keeps the tenant's ports
//! across operator restarts so its endpoint never moves.
//!
//! Every child runs in its own process group; a supervisor task restarts it with
//! exponential backoff (100 ms doubling to 5 s, reset after 30 s of good running). On start
//! the runtime kills every process a previous operator left behind — but only when
//! `/proc/<pid>/stat` still shows the recorded start time, so a recycled pid is never hit —
//! and the controller's next reconcile starts fresh children. Nothing is orphaned and
//! nothing foreign is killed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::error::Error;
use crate::fs::write_atomic;
use crate::render::{ComponentSpec, EnvValue, Ports};

/// Secret name → (key → contents): everything components may reference.
pub type SecretData = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// Finds the binary for a component at a version.
pub type BinaryResolver = Arc<dyn Fn(&ComponentSpec) -> Result<PathBuf, Error> + Send + Sync>;

/// The binary cache resolver: the pinned binary for the component's Kubernetes version.
pub fn cache_resolver() -> BinaryResolver {
    Arc::new(|c: &ComponentSpec| {
        let pins = tether_upstream::Pins::default();
        let version = pins.version_for(c.program.upstream(), &c.version)?;
        Ok(tether_upstream::Cache::from_env().lookup(c.program.upstream(), &version)?)
    })
}

/// Runs tenants' components as local processes.
pub struct ProcessRuntime {
    root: PathBuf,
    resolve: BinaryResolver,
    tenants: Mutex<HashMap<String, Running>>,
    port_lock: Mutex<()>,
}

struct Running {
    hash: String,
    components: Vec<Supervisor>,
}

struct Supervisor {
    name: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pid: Arc<Mutex<Option<u32>>>,
}

impl ProcessRuntime {
    /// A runtime keeping its state under `root/tenants`; kills what a previous operator
    /// left running there.
    pub fn new(root: &Path, resolve: BinaryResolver) -> Result<ProcessRuntime, Error> {
        let tenants = root.join("tenants");
        fs::create_dir_all(&tenants).map_err(Error::io("create", &tenants))?;
        if let Ok(entries) = fs::read_dir(&tenants) {
            for e in entries.flatten() {
                reap_pidfiles(&e.path().join("run"));
            }
        }
        Ok(ProcessRuntime {
            root: root.to_path_buf(),
            resolve,
            tenants: Mutex::new(HashMap::new()),
            port_lock: Mutex::new(()),
        })
    }

    /// The directory of tenant `key` (`<ns>.<name>`).
    pub fn tenant_dir(&self, key: &str) -> PathBuf {
        self.root.join("tenants").join(key)
    }

    /// The tenant's ports, allocated on first use and then stable. Allocation skips every
    /// port another tenant holds and every port something on this machine listens on.
    pub fn ports(&self, key: &str) -> Result<Ports, Error> {
        let _guard = self.port_lock.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.tenant_dir(key);
        let file = dir.join("ports.json");
        if let Ok(b) = fs::read(&file)
            && let Ok(p) = serde_json::from_slice::<Ports>(&b)
        {
            return Ok(p);
        }
        let mut taken = std::collections::HashSet::new();
        if let Ok(entries) = fs::read_dir(self.root.join("tenants")) {
            for e in entries.flatten() {
                if let Ok(b) = fs::read(e.path().join("ports.json"))
                    && let Ok(p) = serde_json::from_slice::<Ports>(&b)
                {
                    taken.extend(port_list(&p));
                }
            }
        }
        let mut next = || crate::ports::free_port(&mut taken);
        let ports = Ports {
            api: next()?,
            konnectivity_agent: next()?,
            konnectivity_admin: next()?,
            konnectivity_health: next()?,
            controller_manager: next()?,
            scheduler: next()?,
            kine: next()?,
        };
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        write_atomic(&file, &serde_json::to_vec(&ports).expect("ports serialise"))?;
        Ok(ports)
    }

    /// Makes tenant `key` run exactly `components` with `secrets`' files. Unchanged input is a
    /// no-op; changed input stops the old set and starts the new one in order (the API
    /// server, and kine before it, first).
    pub fn apply(
        &self,
        key: &str,
        components: &[ComponentSpec],
        secrets: &SecretData,
    ) -> Result<(), Error> {
        let dir = self.tenant_dir(key);
        let mut hasher = Sha256::new();
        hasher.update(format!("{components:?}"));
        for c in components {
            for f in &c.files {
                hasher.update(&f.path);
                hasher.update(lookup(secrets, &f.secret, &f.key)?);
            }
            // Secret-backed environment (kine's DSN) is part of what runs, too: a changed
            // value must restart the component, not leave it on the old one.
            for (k, v) in &c.env {
                if let EnvValue::Secret { secret, key } = v {
                    hasher.update(k);
                    hasher.update(lookup(secrets, secret, key)?);
                }
            }
        }
        let hash = hex::encode(hasher.finalize());
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = tenants.get(key)
            && r.hash == hash
            && r.components.iter().all(|s| !s.task.is_finished())
        {
            return Ok(());
        }
        if let Some(old) = tenants.remove(key) {
            stop_all(old);
        }
        for sub in ["logs", "run", "konnectivity"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
        }
        let mut started = Vec::new();
        for c in components {
            for f in &c.files {
                let path = dir.join(&f.path);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
                }
                write_atomic(&path, lookup(secrets, &f.secret, &f.key)?)?;
            }
            let mut env = BTreeMap::new();
            for (k, v) in &c.env {
                let value = match v {
                    EnvValue::Literal(s) => s.clone(),
                    EnvValue::Secret { secret, key } => {
                        String::from_utf8_lossy(lookup(secrets, secret, key)?).into_owned()
                    }
                };
                env.insert(k.clone(), value);
            }
            let binary = (self.resolve)(c)?;
            started.push(supervise(
                c.program.name(),
                binary,
                c.args.clone(),
                env,
                &dir,
            ));
        }
        tenants.insert(
            key.to_string(),
            Running {
                hash,
                components: started,
            },
        );
        Ok(())
    }

    /// Stops the tenant's processes and removes its directory.
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        let old = self
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(old) = old {
            stop_all(old);
        }
        let dir = self.tenant_dir(key);
        reap_pidfiles(&dir.join("run"));
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir)(e)),
        }
    }

    /// Current pid of each running component of tenant `key` (for tests and RSS figures).
    pub fn pids(&self, key: &str) -> BTreeMap<String, u32> {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants
            .get(key)
            .map(|r| {
                r.components
                    .iter()
                    .filter_map(|s| Some((s.name.clone(), (*s.pid.lock().ok()?)?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops every tenant (operator shutdown); the pidfiles go with them.
    pub fn shutdown(&self) {
        let all: Vec<Running> = self
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in all {
            stop_all(r);
        }
    }
}

fn port_list(p: &Ports) -> [u16; 7] {
    [
        p.api,
        p.konnectivity_agent,
        p.konnectivity_admin,
        p.konnectivity_health,
        p.controller_manager,
        p.scheduler,
        p.kine,
    ]
}

fn lookup<'a>(secrets: &'a SecretData, secret: &str, key: &str) -> Result<&'a [u8], Error> {
    secrets
        .get(secret)
        .and_then(|s| s.get(key))
        .map(|v| v.as_slice())
        .ok_or_else(|| Error::Invalid(format!("Secret {secret} has no key {key}")))
}

/// Removes `pidfile` only if it still records `record`: a supervisor stopping late must not
/// delete the pidfile its successor (same component, same tenant) already wrote, or a
/// crash of the operator would orphan the successor.
fn remove_pidfile_if(pidfile: &Path, record: Option<&str>) {
    if let Some(record) = record
        && fs::read_to_string(pidfile).is_ok_and(|s| s == record)
    {
        let _ = fs::remove_file(pidfile);
    }
}

fn stop_all(r: Running) {
    // Reverse order: the API server goes last so others do not spin on it.
    for s in r.components.into_iter().rev() {
        let _ = s.stop.send(true);
        let pid = *s.pid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = pid {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        // The supervisor escalates to SIGKILL and removes the pidfile; detach it.
        drop(s.task);
    }
}

/// `starttime` (field 22) of `/proc/<pid>/stat`: with the pid, the identity of a process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the process groups recorded in `run_dir/*.pid` whose identity still matches.
pub fn reap_pidfiles(run_dir: &Path) {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "pid") {
            continue;
        }
        if let Ok(s) = fs::read_to_string(&path) {
            let mut it = s.split_whitespace();
            if let (Some(Ok(pid)), Some(Ok(start))) = (
                it.next().map(str::parse::<u32>),
                it.next().map(str::parse::<u64>),
            ) && start_time(pid) == Some(start)
            {
                tracing::info!(pid, file = %path.display(), "killing process left by a previous operator");
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let _ = fs::remove_file(&path);
    }
}

fn supervise(
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    dir: &Path,
) -> Supervisor {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let pid_slot = Arc::new(Mutex::new(None));
    let slot = pid_slot.clone();
    let dir = dir.to_path_buf();
    let task = tokio::spawn(async move {
        let log = dir.join("logs").join(format!("{name}.log"));
        let pidfile = dir.join("run").join(format!("{name}.pid"));
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let child = spawn(&binary, &args, &env, &dir, &log);
            match child {
                Err(e) => tracing::warn!(component = name, "start failed: {e}"),
                Ok(mut child) => {
                    let pid = child.id().unwrap_or(0);
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
                    let record = start_time(pid).map(|st| format!("{pid} {st}\n"));
                    if let Some(r) = &record
                        && let Err(e) = write_atomic(&pidfile, r.as_bytes())
                    {
                        tracing::warn!(component = name, pid, "pidfile: {e}");
                    }
                    tracing::debug!(component = name, pid, "started");
                    tokio::select! {
                        status = child.wait() => {
                            tracing::warn!(component = name, pid, ?status, "exited; restarting");
                            // Take down anything it forked.
                            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        }
                        _ = stop_rx.changed() => {
                            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
                            let graceful = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                            if graceful.is_err() {
                                let _ = child.wait().await;
                            }
                            remove_pidfile_if(&pidfile, record.as_deref());
                            return;
                        }
                    }
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop_rx.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    Supervisor {
        name: name.to_string(),
        stop: stop_tx,
        task,
        pid: pid_slot,
    }
}

fn spawn(
    binary: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
    dir: &Path,
    log: &Path,
) -> Result<tokio::process::Child, Error> {
    // Logs may quote credentials (a DSN in an error): owner-only, like the files.
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(Error::io("open log", log))?;
    let err = out.try_clone().map_err(Error::io("dup log", log))?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .envs(env)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn().map_err(|e| Error::Command {
        command: binary.display().to_string(),
        detail: format!("spawn: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_reads_own_process() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(u32::MAX - 1), None);
    }

    #[test]
    fn stale_pidfile_with_wrong_identity_is_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wrong start time: must survive and the pidfile must go.
        fs::write(dir.path().join("x.pid"), format!("{pid} 1\n")).unwrap();
        reap_pidfiles(dir.path());
        assert!(child.try_wait().unwrap().is_none());
        assert!(!dir.path().join("x.pid").exists());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn matching_pidfile_kills_the_group() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let st = start_time(pid).unwrap();
        fs::write(dir.path().join("x.pid"), format!("{pid} {st}\n")).unwrap();
        reap_pidfiles(dir.path());
        let status = child.wait().unwrap();
        assert!(!status.success());
    }

    #[tokio::test]
    async fn supervisor_restarts_killed_child_and_stops_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("logs")).unwrap();
        fs::create_dir_all(dir.path().join("run")).unwrap();
        let s = supervise(
            "sleeper",
            PathBuf::from("/bin/sleep"),
            vec!["30".into()],
            BTreeMap::new(),
            dir.path(),
        );
        let first = wait_pid(&s, None).await;
        nix::sys::signal::kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
        let second = wait_pid(&s, Some(first)).await;
        assert_ne!(first, second);
        let _ = s.stop.send(true);
        s.task.await.unwrap();
        assert!(
            start_time(second).is_none()
                || fs::read_to_string(format!("/proc/{second}/stat"))
                    .unwrap()
                    .contains(" Z ")
        );
        assert!(!dir.path().join("run/sleeper.pid").exists());
    }

    #[tokio::test]
    async fn late_stopping_supervisor_keeps_its_successors_pidfile() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("logs")).unwrap();
        fs::create_dir_all(dir.path().join("run")).unwrap();
        // Ignores SIGTERM, so the old supervisor needs its full grace period to stop.
        let stubborn = || {
            supervise(
                "stubborn",
                PathBuf::from("/bin/sh"),
                vec!["-c".into(), "trap '' TERM; sleep 30".into()],
                BTreeMap::new(),
                dir.path(),
            )
        };
        let old = stubborn();
        wait_pid(&old, None).await;
        let _ = old.stop.send(true);
        let new = stubborn();
        let new_pid = wait_pid(&new, None).await;
        let pidfile = dir.path().join("run/stubborn.pid");
        for _ in 0..100 {
            if fs::read_to_string(&pidfile).is_ok_and(|s| s.starts_with(&format!("{new_pid} "))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        old.task.await.unwrap();
        let record = fs::read_to_string(&pidfile).expect("successor's pidfile removed");
        assert!(record.starts_with(&format!("{new_pid} ")), "{record}");
        let _ = new.stop.send(true);
        new.task.await.unwrap();
        assert!(!pidfile.exists());
    }

    #[tokio::test]
    async fn changed_secret_environment_restarts_the_component() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(
            dir.path(),
            Arc::new(|_: &ComponentSpec| Ok(PathBuf::from("/bin/sleep"))),
        )
        .unwrap();
        let component = ComponentSpec {
            program: crate::render::Program::Kine,
            version: "v1.36.3".into(),
            args: vec!["30".into()],
            files: vec![],
            env: BTreeMap::from([(
                "DSN".to_string(),
                EnvValue::Secret {
                    secret: "t-datastore".into(),
                    key: "dsn".into(),
                },
            )]),
            ports: vec![],
            probe: crate::render::Probe {
                scheme: "http",
                port: "etcd",
                path: "/",
            },
        };
        let secrets = |dsn: &str| -> SecretData {
            BTreeMap::from([(
                "t-datastore".to_string(),
                BTreeMap::from([("dsn".to_string(), dsn.as_bytes().to_vec())]),
            )])
        };
        async fn pid(rt: &ProcessRuntime) -> u32 {
            for _ in 0..100 {
                if let Some(p) = rt.pids("ns.t").get("kine") {
                    return *p;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("kine never started");
        }
        let comps = std::slice::from_ref(&component);
        rt.apply("ns.t", comps, &secrets("postgres://a")).unwrap();
        let first = pid(&rt).await;
        rt.apply("ns.t", comps, &secrets("postgres://a")).unwrap();
        assert_eq!(pid(&rt).await, first, "unchanged input restarted kine");
        rt.apply("ns.t", comps, &secrets("postgres://b")).unwrap();
        assert_ne!(pid(&rt).await, first, "a new DSN left kine on the old one");
        rt.delete("ns.t").unwrap();
    }

    async fn wait_pid(s: &Supervisor, not: Option<u32>) -> u32 {
        for _ in 0..100 {
            if let Some(p) = *s.pid.lock().unwrap()
                && Some(p) != not
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no new pid");
    }
}
