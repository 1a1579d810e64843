//! Records of what the harness created, so the next run can clean up after a killed one.
//!
//! Each record names its owner (pid + start time, so a reused pid is not mistaken for the
//! owner). [`reap_stale`] runs once per test process before the first resource is made and
//! removes what dead owners left: process groups, network namespaces.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use nix::sys::signal::Signal;

use crate::process::signal_group;
use crate::{Error, Result};

/// Where records live: `$TETHER_TESTKIT_STATE`, else `/run/tether-testkit`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("TETHER_TESTKIT_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/tether-testkit"))
}

/// `pid starttime` of a process, `None` if it does not exist.
fn identity(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime); the command name (field 2) may contain spaces, so split after ')'.
    let after = stat.rsplit_once(')')?.1;
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

fn me() -> String {
    identity(std::process::id()).unwrap_or_else(|| format!("{} 0", std::process::id()))
}

fn owner_alive(record: &str) -> bool {
    let mut parts = record.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(pid), Some(_)) => pid
            .parse::<u32>()
            .ok()
            .and_then(identity)
            .is_some_and(|now| now == record.trim()),
        _ => false,
    }
}

fn write_record(kind: &str, name: &str) -> Result<PathBuf> {
    reap_stale_once();
    let dir = state_dir().join(kind);
    fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    let path = dir.join(name);
    fs::write(&path, me()).map_err(Error::io("write", &path))?;
    Ok(path)
}

/// Records a process group owned by this process, named `<pgid>-<leader start time>` so
/// the reaper can tell the group from a later process that got the same number. (The
/// record's content stays the owner alone, which older reapers also read.)
pub(crate) fn record_process_group(pgid: u32) -> Result<PathBuf> {
    let name = identity(pgid)
        .map(|id| id.replace(' ', "-"))
        .unwrap_or_else(|| pgid.to_string());
    write_record("pgid", &name)
}

/// The group a `pgid` record names, if it may be killed: its leader is gone (the kernel
/// does not reuse a pid while its group lives, so the number names that group or nothing)
/// or is still the recorded process. A leader pid now held by another process means the
/// group died and the number was recycled: not ours to kill.
fn group_to_kill(name: &str) -> Option<i32> {
    let (pgid, start) = match name.split_once('-') {
        Some((p, s)) => (p.parse::<u32>().ok()?, Some(s)),
        None => (name.parse::<u32>().ok()?, None),
    };
    match (start, identity(pgid)) {
        (_, None) | (None, Some(_)) => Some(pgid as i32),
        (Some(s), Some(now)) => (now == format!("{pgid} {s}")).then_some(pgid as i32),
    }
}

/// Records a network namespace owned by this process.
pub(crate) fn record_netns(name: &str) -> Result<PathBuf> {
    write_record("netns", name)
}

fn reap_stale_once() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(reap_stale);
}

/// Removes every recorded resource whose owner is dead.
pub fn reap_stale() {
    for (kind, name, path) in records() {
        let Ok(owner) = fs::read_to_string(&path) else {
            continue;
        };
        if owner_alive(&owner) {
            continue;
        }
        match kind.as_str() {
            "pgid" => {
                if let Some(pgid) = group_to_kill(&name) {
                    signal_group(pgid, Signal::SIGKILL);
                }
            }
            "netns" => {
                let _ = Command::new("ip").args(["netns", "delete", &name]).output();
            }
            _ => {}
        }
        tracing::info!(kind, name, "removed leftover of a killed test run");
        let _ = fs::remove_file(&path);
    }
}

fn records() -> Vec<(String, String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(kinds) = fs::read_dir(state_dir()) else {
        return out;
    };
    for kind in kinds.flatten() {
        let Ok(entries) = fs::read_dir(kind.path()) else {
            continue;
        };
        for e in entries.flatten() {
            out.push((
                kind.file_name().to_string_lossy().into_owned(),
                e.file_name().to_string_lossy().into_owned(),
                e.path(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_is_alive_and_fake_is_not() {
        assert!(owner_alive(&me()));
        assert!(!owner_alive(&format!("{} 1", std::process::id())));
        assert!(!owner_alive("4194304 5"));
        assert!(!owner_alive("garbage"));
    }

    #[test]
    fn recycled_group_leader_is_not_killed() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let recorded = identity(pid).unwrap().replace(' ', "-");
        assert_eq!(group_to_kill(&recorded), Some(pid as i32));
        // Same pid, another start time: a recycled pid, someone else's process.
        assert_eq!(group_to_kill(&format!("{pid}-1")), None);
        assert_eq!(group_to_kill("garbage"), None);
        child.kill().unwrap();
        child.wait().unwrap();
        // Leader gone: the number names the old group or nothing.
        assert_eq!(group_to_kill(&format!("{pid}-1")), Some(pid as i32));
    }
}
