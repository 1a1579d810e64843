//! Network namespaces with bridges, veth pairs and taps, made with iproute2.
//!
//! Each namespace is named `tt-<pid>-<n>` and recorded in [`crate::state`], so a run killed
//! before its destructors ran has its namespaces removed by the next run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Error, Result, state};

/// A network namespace owned by this test process; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    record: PathBuf,
}

impl NetNs {
    /// Creates a namespace with its loopback up.
    pub fn create() -> Result<NetNs> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let record = state::record_netns(&name)?;
        // Left over from a pid-reusing earlier run (records said it was dead): replace it.
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name, record };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `systemd-nspawn --network-namespace-path` and friends.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a program inside the namespace; returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A `Command` that runs `program` inside the namespace (for long-running processes).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Adds a bridge, optionally with an address (`10.0.0.1/24`), and brings it up.
    pub fn add_bridge(&self, name: &str, address: Option<&str>) -> Result<()> {
        check_ifname(name)?;
        self.ip(&["link", "add", name, "type", "bridge"])?;
        if let Some(addr) = address {
            self.ip(&["addr", "add", addr, "dev", name])?;
        }
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// Adds a tap device (for a qemu NIC), optionally enslaved to `bridge`, and brings it up.
    pub fn add_tap(&self, name: &str, bridge: Option<&str>) -> Result<()> {
        check_ifname(name)?;
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        self.attach(name, bridge)
    }

    /// Adds a veth pair `local` (here) ↔ `peer` (in `peer_ns`, or here too when `None`);
    /// `local` is enslaved to `bridge` when given. Both ends are brought up.
    pub fn add_veth(
        &self,
        local: &str,
        peer: &str,
        peer_ns: Option<&NetNs>,
        bridge: Option<&str>,
    ) -> Result<()> {
        check_ifname(local)?;
        check_ifname(peer)?;
        let mut args = vec!["link", "add", local, "type", "veth", "peer", "name", peer];
        if let Some(ns) = peer_ns {
            args.extend_from_slice(&["netns", ns.name()]);
        }
        self.ip(&args)?;
        self.attach(local, bridge)?;
        match peer_ns {
            Some(ns) => ns.ip(&["link", "set", peer, "up"])?,
            None => self.ip(&["link", "set", peer, "up"])?,
        };
        Ok(())
    }

    fn attach(&self, name: &str, bridge: Option<&str>) -> Result<()> {
        if let Some(br) = bridge {
            self.ip(&["link", "set", name, "master", br])?;
        }
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// Adds an address to an interface.
    pub fn add_address(&self, dev: &str, address: &str) -> Result<()> {
        self.ip(&["addr", "add", address, "dev", dev]).map(|_| ())
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        let _ = std::fs::remove_file(&self.record);
    }
}

/// Linux interface names are at most 15 bytes and may not contain `/` or whitespace.
fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.chars().any(char::is_whitespace)
    {
        return Err(Error::Command {
            command: "ip link add".into(),
            detail: format!("invalid interface name {name:?}"),
        });
    }
    Ok(())
}

/// Runs `ip` with `args`; stdout on success, stderr in the error.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|_| Error::MissingTool {
            tool: "ip".into(),
            hint: "install iproute2".into(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::check_ifname;

    #[test]
    fn interface_names() {
        for ok in ["br0", "tap-a", "veth123456789ab"] {
            assert!(check_ifname(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "has space", "veth1234567890ab"] {
            assert!(check_ifname(bad).is_err(), "{bad}");
        }
    }
}
