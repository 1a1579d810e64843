//! One supervised child process: its own process group, a log file, a pidfile recording
//! `<pid> <start time>` so a later operator can kill exactly what this one left behind, and
//! restarts with exponential backoff (100 ms doubling to 5 s, reset after 30 s of good
//! running).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::error::Error;
use crate::fs::write_atomic;

/// A running supervisor task and the pid of its current child.
pub struct Supervisor {
    name: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pid: Arc<Mutex<Option<u32>>>,
}

impl Supervisor {
    /// The component name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current child's pid, if one runs.
    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the supervisor task ended (it never does unless stopped or panicked).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Asks the child to stop (SIGTERM to its group); the task escalates to SIGKILL after a
    /// grace period and removes the pidfile. Await the handle to know the child is gone
    /// (a shutting-down operator must, or its children outlive it); drop it to go on.
    pub fn stop(self) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.send(true);
        if let Some(pid) = self.pid() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        self.task
    }
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

/// `starttime` (field 22) of `/proc/<pid>/stat`: with the pid, the identity of a process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the process groups recorded in `run_dir/*.pid` whose identity still matches;
/// how many it killed.
pub fn reap_pidfiles(run_dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return 0;
    };
    let mut killed = 0;
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
                killed += 1;
            }
        }
        let _ = fs::remove_file(&path);
    }
    killed
}

/// Starts supervising `binary args` with `env` in `dir` (logs in `dir/logs`, pidfile in
/// `dir/run`).
pub fn supervise(
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
        assert_eq!(reap_pidfiles(dir.path()), 0);
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
        assert_eq!(reap_pidfiles(dir.path()), 1);
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
