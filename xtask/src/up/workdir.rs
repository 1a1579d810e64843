//! `up`'s directory and what a run leaves in it.
//!
//! `target/tether-up/` (or `$TETHER_UP_DIR`) holds:
//! - `lock`: held for the whole run, so a second `up` stops with a clear error;
//! - `keys/`, `image/`, `image-disk/`: the signing key and the built images, kept between
//!   runs (the image is rebuilt only when its inputs change);
//! - `run/`: this run's site — the management plane's data, logs, serial consoles. A new
//!   run first kills whatever a killed run left (the testkit's records of process groups and
//!   namespaces, then the pidfiles of the management plane's and tenants' processes), then
//!   replaces `run/`: machines enroll afresh against a new segment address every run. The
//!   teardown runs the same pidfile reaping as a backstop.

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
    /// Takes the lock, so that a second `up` stops before it installs or builds anything.
    pub fn claim() -> Result<WorkDir, Error> {
        let root = std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir().join("tether-up"));
        fs::create_dir_all(&root).map_err(|e| err("create", &root, e))?;
        let root = root.canonicalize().map_err(|e| err("resolve", &root, e))?;
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| err("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => Ok(WorkDir { root, _lock: lock }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Usage(format!(
                "another `cargo xtask up` holds {} — stop it first (Ctrl-C)",
                lock_path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(err("lock", &lock_path, e)),
        }
    }

    /// This run's site directory.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Kills what an earlier run left behind and makes an empty `run/`.
    pub fn fresh_run(&self) -> Result<(), Error> {
        // qemu, tether-pxe, dnsmasq, the operator; the segment's namespace.
        tether_testkit::state::reap_stale();
        let killed = self.reap_run_pidfiles();
        if killed > 0 {
            println!(
                "    cleaned up after an earlier run that did not finish: killed {killed} \
                 processes of its management plane and tenants"
            );
        }
        let run = self.run();
        if run.exists() {
            fs::remove_dir_all(&run).map_err(|e| err("remove", &run, e))?;
        }
        fs::create_dir_all(&run).map_err(|e| err("create", &run, e))
    }

    /// Kills the processes the pidfiles below `run/` name (the management plane's and the
    /// tenants' supervised processes, in process groups of their own that outlive a killed
    /// operator); how many.
    pub fn reap_run_pidfiles(&self) -> usize {
        run_dirs(&self.run())
            .iter()
            .map(|d| tether_operator::controlplane::runtime::supervisor::reap_pidfiles(d))
            .sum()
    }
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `target/` in the workspace).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
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

/// What of a run is still there after teardown: processes of the programs `up` runs
/// whose command line names `dir`, mounts below it, and the network namespaces in
/// `namespaces` (empty when all is gone). A `tail -f` of a serial log is not a leftover.
pub fn leftovers(dir: &Path, namespaces: &[String]) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let programs = [
        target_dir(),
        tether_upstream::Cache::from_env().root().to_path_buf(),
    ];
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let exe = fs::read_link(e.path().join("exe")).unwrap_or_default();
        if cmdline.contains(&needle) && is_ours(&exe, &programs) {
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

/// A program `up` runs: built here or cached, qemu, dnsmasq.
fn is_ours(exe: &Path, programs: &[PathBuf]) -> bool {
    let name = exe.file_name().unwrap_or_default().to_string_lossy();
    programs.iter().any(|p| exe.starts_with(p))
        || name.starts_with("qemu-system")
        || name == "dnsmasq"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_found_at_any_depth() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("management/run");
        let b = t.path().join("tenants/default-q/run");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::create_dir_all(t.path().join("logs")).unwrap();
        let mut found = run_dirs(t.path());
        found.sort();
        assert_eq!(found, vec![a.clone(), b.clone()]);
    }

    #[test]
    fn ours_are_the_programs_up_runs() {
        let programs = [
            PathBuf::from("/w/target"),
            PathBuf::from("/root/.cache/tether"),
        ];
        for (exe, want) in [
            ("/w/target/debug/tether-operator", true),
            ("/root/.cache/tether/bin/etcd/v3.6.16/etcd", true),
            ("/usr/bin/qemu-system-x86_64", true),
            ("/usr/sbin/dnsmasq", true),
            ("/usr/bin/tail", false),
            ("/usr/bin/less", false),
            ("", false),
        ] {
            assert_eq!(is_ours(Path::new(exe), &programs), want, "{exe}");
        }
    }

    #[test]
    fn leftovers_finds_a_process_of_ours_naming_the_directory() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(leftovers(t.path(), &[]), Vec::<String>::new());
        // A copy of `sh` under the target directory counts as ours; `sh` itself not. Each
        // runs `sleep 30; true` (not exec'd away) with the marker path as its $0.
        let ours = target_dir().join(format!("leftover-test-{}", std::process::id()));
        fs::copy("/bin/sh", &ours).unwrap();
        let marker = t.path().join("marker");
        let spawn = |program: &Path| {
            std::process::Command::new(program)
                .args(["-c", "sleep 30; true"])
                .arg(&marker)
                .spawn()
                .unwrap()
        };
        let mut theirs = spawn(Path::new("/bin/sh"));
        let mut child = spawn(&ours);
        // `spawn` returns once exec began, a moment before the kernel shows the new command
        // line: wait for it (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for pid in [child.id(), theirs.id()] {
            let cmdline = format!("/proc/{pid}/cmdline");
            while !fs::read(&cmdline).is_ok_and(|c| c.ends_with(b"marker\0")) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{cmdline} never named the marker"
                );
                std::thread::yield_now();
            }
        }
        let found = leftovers(t.path(), &["tt-no-such-namespace".into()]);
        for c in [&mut child, &mut theirs] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        let _ = fs::remove_file(&ours);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!("process {}:", child.id())),
            "{found:?}"
        );
        assert!(leftovers(t.path(), &["tt-no-such-namespace".into()]).is_empty());
    }
}
