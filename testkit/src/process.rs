//! Supervised child processes for tests: own process group, log file, killed on drop.
//!
//! Every child runs in a new process group so that dropping the handle kills it together
//! with anything it forked. The group id is recorded under the state directory with the
//! owning test process's pid; [`reap_stale`] kills groups whose owner died (a test binary
//! killed by a timeout never runs its destructors).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::state;
use crate::{Error, Result};

/// A running child process whose output goes to a log file.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    record: PathBuf,
}

impl Process {
    /// Spawns `cmd` in its own process group with stdout+stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Process> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io("open log", log))?;
        let err = out.try_clone().map_err(Error::io("dup log", log))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let program = format!("{:?}", cmd.get_program());
        let child = cmd.spawn().map_err(|e| Error::Command {
            command: program,
            detail: format!("spawn: {e}"),
        })?;
        let record = state::record_process_group(child.id())?;
        Ok(Process {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            record,
        })
    }

    /// The process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Fails with the log tail if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                component: self.name.clone(),
                status: status.to_string(),
                log_tail: self.log_tail(40),
            }),
            Err(e) => Err(Error::Exited {
                component: self.name.clone(),
                status: format!("unknown: {e}"),
                log_tail: self.log_tail(40),
            }),
        }
    }

    /// Sends SIGTERM to the group, waits up to `grace`, then SIGKILLs it.
    pub fn stop(&mut self, grace: Duration) {
        let pgid = self.child.id() as i32;
        signal_group(pgid, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Kill the whole group even if the leader is gone: children may remain.
        signal_group(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.record);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Sends `sig` to process group `pgid` (ignores errors: the group may already be gone).
pub(crate) fn signal_group(pgid: i32, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// The last `lines` lines of a file (reads at most the last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
