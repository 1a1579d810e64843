//! `up`'s directory and what a run leaves in it.
//!
//! `target/tether-up/` (or `$TETHER_UP_DIR`) holds:
//! - `lock`: held for the whole run, so a second `up` stops with a clear error;
//! - `keys/`, `image/`, `image-disk/`: the signing key and the built images, kept between
//!   runs (the image is rebuilt only when its inputs change);
//! - `run/`: this run's site — the management plane's data, logs, serial consoles. A new
//!   run first kills whatever a killed run left (the testkit's records of process groups and
//!   namespaces, then the pidfiles of the management plane's and tenants' processes), then
//!   replaces `run/`: machines enroll afresh against a new segment address every run.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::steps::workspace_root;

/// Overrides where `up` keeps its state (the CI test uses its own).
pub const DIR_ENV: &str = "TETHER_UP_DIR";

/// The claimed directory; the lock is released on drop.
pub struct WorkDir {
    /// The top directory.
    pub root: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// Takes the lock, reaps a killed run's leftovers and makes an empty `run/`.
    pub fn claim() -> Result<WorkDir, Error> {
        let root = std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/tether-up"));
        fs::create_dir_all(&root).map_err(|e| err("create", &root, e))?;
        let root = root.canonicalize().map_err(|e| err("resolve", &root, e))?;
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| err("open", &lock_path, e))?;
        if lock.try_lock().is_err() {
            return Err(Error::Usage(format!(
                "another `cargo xtask up` holds {} — stop it first (Ctrl-C)",
                lock_path.display()
            )));
        }
        let dir = WorkDir { root, _lock: lock };
        let reaped = dir.reap_leftovers()?;
        if reaped > 0 {
            println!(
                "    cleaned up after an earlier run that did not finish ({reaped} process groups)"
            );
        }
        fs::create_dir_all(dir.run()).map_err(|e| err("create", &dir.run(), e))?;
        Ok(dir)
    }

    /// This run's site directory.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Kills what an earlier run left behind and removes its `run/`; the number of the
    /// management plane's process groups it found still running.
    fn reap_leftovers(&self) -> Result<usize, Error> {
        // qemu, tether-pxe, dnsmasq, the operator; the segment's namespace.
        tether_testkit::state::reap_stale();
        let run = self.run();
        let mut found = 0;
        for pids in run_dirs(&run) {
            found += live_pidfiles(&pids);
            tether_operator::controlplane::runtime::supervisor::reap_pidfiles(&pids);
        }
        if run.exists() {
            fs::remove_dir_all(&run).map_err(|e| err("remove", &run, e))?;
        }
        Ok(found)
    }
}

fn err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Step {
        step: "up directory".into(),
        detail: format!("{what} {}: {e}", path.display()),
    }
}

/// Every directory named `run` below `dir`: where the operator's supervisors keep pidfiles.
fn run_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() && !kind.is_symlink() {
            if e.file_name() == "run" {
                out.push(e.path());
            }
            out.extend(run_dirs(&e.path()));
        }
    }
    out
}

/// Pidfiles in `dir` whose process still exists.
fn live_pidfiles(dir: &Path) -> usize {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|t| t.split_whitespace().next().map(str::to_string))
        .filter(|pid| Path::new("/proc").join(pid).exists())
        .count()
}

/// What of a run is still there after teardown: processes whose command line names `dir`,
/// mounts below it, and the network namespaces in `namespaces` (empty when all is gone).
pub fn leftovers(dir: &Path, namespaces: &[String]) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            out.push(format!("process {pid}: {}", cmdline.trim()));
        }
    }
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    out.extend(
        mounts
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|m| m.starts_with(&needle))
            })
            .map(|l| format!("mount: {l}")),
    );
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for ns in namespaces {
        if listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns.as_str()))
        {
            out.push(format!("network namespace {ns}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_found_at_any_depth_and_pidfiles_of_the_dead_do_not_count() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("management/run");
        let b = t.path().join("tenants/default-q/run");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::create_dir_all(t.path().join("logs")).unwrap();
        let mut found = run_dirs(t.path());
        found.sort();
        assert_eq!(found, vec![a.clone(), b.clone()]);
        fs::write(a.join("etcd.pid"), format!("{} 1\n", std::process::id())).unwrap();
        fs::write(b.join("api.pid"), "4194304 1\n").unwrap();
        fs::write(b.join("notes.txt"), "1\n").unwrap();
        assert_eq!(live_pidfiles(&a), 1);
        assert_eq!(live_pidfiles(&b), 0);
    }

    #[test]
    fn leftovers_finds_a_process_naming_the_directory_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(leftovers(t.path(), &[]), Vec::<String>::new());
        // `sh -c '…; true' <path>`: the shell (not exec'd away) carries the path as $0.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true"])
            .arg(t.path().join("marker"))
            .spawn()
            .unwrap();
        // `spawn` returns once exec began, a moment before the kernel shows the new command
        // line: wait for it.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        while !std::fs::read(&cmdline).is_ok_and(|c| c.ends_with(b"marker\0")) {
            std::thread::yield_now();
        }
        let found = leftovers(t.path(), &["tt-no-such-namespace".into()]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!("process {}:", child.id())),
            "{found:?}"
        );
        assert!(leftovers(t.path(), &["tt-no-such-namespace".into()]).is_empty());
    }
}
