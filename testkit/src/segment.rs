//! A boot segment: one L2 network that machines PXE-boot on, made of a network namespace
//! holding a bridge, the site's own DHCP server (dnsmasq, which knows nothing of PXE — as on
//! a real site), and an uplink veth whose host end carries the segment's `.1` address.
//!
//! ```text
//!  host netns                         segment netns (tt-<pid>-<n>)
//!  ┌──────────────────────────┐       ┌────────────────────────────────────────┐
//!  │ management plane, machine │ veth │ br0 ── dnsmasq 10.a.b.2 (site DHCP)      │
//!  │ API, tenant endpoints,    ├──────┤  ├── tap: qemu VM                        │
//!  │ tether-pxe on <uplink>    │ .1   │  └── veth: a node netns (nspawn node)    │
//!  └──────────────────────────┘       └────────────────────────────────────────┘
//! ```
//!
//! Everything the host offers machines listens on the uplink's address (reached by nothing
//! but this segment), and tether-pxe runs in the host namespace bound to the uplink, where
//! broadcasts from the bridge arrive. Traffic never leaves namespaces this code made.
//!
//! Two things make the site's dnsmasq behave like a well-run site rather than a bare one,
//! each worth seconds of every PXE boot under TCG (measured in docs/benchmarks.md):
//! - **IPv6 router advertisements** on the bridge (a ULA `fd7e:a:b::/64`, router lifetime
//!   0: not a default router). iPXE configures IPv4 and IPv6 together and boots only when
//!   both are done; on a segment where no router answers its solicitations it waits for
//!   its IPv6 timer to give up, about 16 s. The host end of the uplink has IPv6 off, so
//!   the host takes no address from them, and so do the nodes' own namespaces (the image's
//!   networkd config is IPv4-only; the kernel would autoconfigure before networkd runs).
//!   On a host without IPv6 the segment has none, and PXE boots pay the 16 s.
//! - **No ping check** (`--no-ping`): dnsmasq otherwise pings an address before offering
//!   it and, single-threaded, answers nothing else meanwhile (3 s per offer). Nothing but
//!   this dnsmasq hands out addresses here.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::NetNs;
use crate::process::Process;
use crate::{Error, Result};

/// The bridge inside the segment namespace.
pub const BRIDGE: &str = "br0";

/// A booted segment; everything goes away on drop.
pub struct Segment {
    dhcp: Process,
    ns: NetNs,
    /// The host has IPv6: the segment advertises a prefix, and nodes must ignore it.
    ipv6: bool,
    uplink: String,
    prefix: [u8; 3],
    next_port: AtomicU32,
}

impl Segment {
    /// Makes the namespace, bridge, uplink and site DHCP server. `dir` holds dnsmasq's log
    /// and leases.
    pub fn create(dir: &Path) -> Result<Segment> {
        let prefix = free_prefix()?;
        let ns = NetNs::create()?;
        ns.add_bridge(BRIDGE, Some(&format!("{}/24", addr(prefix, 2))))?;
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        if ipv6 {
            ns.ip(&["-6", "addr", "add", &ula(prefix, 2), "dev", BRIDGE, "nodad"])?;
        }
        let uplink = format!("tsg{}", std::process::id() % 1_000_000);
        let _ = Command::new("ip")
            .args(["link", "delete", &uplink])
            .output();
        run(Command::new("ip").args([
            "link",
            "add",
            &uplink,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            ns.name(),
        ]))?;
        // The router advertisements are for the machines, not for the host.
        let v6 = format!("/proc/sys/net/ipv6/conf/{uplink}/disable_ipv6");
        if std::path::Path::new(&v6).exists() {
            std::fs::write(&v6, "1").map_err(|e| Error::Command {
                command: format!("write {v6}"),
                detail: e.to_string(),
            })?;
        }
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/24", addr(prefix, 1)),
            "dev",
            &uplink,
        ]))?;
        run(Command::new("ip").args(["link", "set", &uplink, "up"]))?;
        ns.ip(&["link", "set", "up0", "master", BRIDGE])?;
        ns.ip(&["link", "set", "up0", "up"])?;
        let dhcp = start_dnsmasq(&ns, prefix, dir, ipv6)?;
        Ok(Segment {
            dhcp,
            ns,
            uplink,
            prefix,
            ipv6,
            next_port: AtomicU32::new(0),
        })
    }

    /// The segment namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The host's address on the segment (`10.a.b.1`): where machines find the management
    /// plane, the machine API, tenant endpoints and tether-pxe's HTTP.
    pub fn host_ip(&self) -> Ipv4Addr {
        addr(self.prefix, 1)
    }

    /// The site DHCP server's address (`10.a.b.2`).
    pub fn dhcp_ip(&self) -> Ipv4Addr {
        addr(self.prefix, 2)
    }

    /// The host end of the uplink: the interface tether-pxe serves on.
    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    /// dnsmasq's log (every lease it hands out).
    pub fn dhcp_log(&self) -> String {
        self.dhcp.log_tail(200)
    }

    /// A tap on the bridge for a qemu NIC; returns its name.
    pub fn add_tap(&self) -> Result<String> {
        let name = format!("tap{}", self.next_port.fetch_add(1, Ordering::Relaxed));
        self.ns.add_tap(&name, Some(BRIDGE))?;
        Ok(name)
    }

    /// A node's own network namespace wired to the bridge: its NIC is `eth0` with `mac`
    /// (so the image's networkd config DHCPs on it), nothing configured — the node does that.
    pub fn add_node_netns(&self, mac: &str) -> Result<NetNs> {
        let node = NetNs::create()?;
        let port = format!("vn{}", self.next_port.fetch_add(1, Ordering::Relaxed));
        self.ns.add_veth(&port, "eth0", Some(&node), Some(BRIDGE))?;
        node.ip(&["link", "set", "eth0", "down"])?;
        if self.ipv6 {
            node.exec(
                "sh",
                &[
                    "-c",
                    "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_ra \
                     && echo 0 > /proc/sys/net/ipv6/conf/eth0/autoconf",
                ],
            )?;
        }
        node.ip(&["link", "set", "eth0", "address", mac])?;
        node.ip(&["link", "set", "eth0", "up"])?;
        Ok(node)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.dhcp.stop(std::time::Duration::from_secs(2));
        // Deleting the namespace takes the veth pair with it; the host end too, to be sure.
        let _ = Command::new("ip")
            .args(["link", "delete", &self.uplink])
            .output();
    }
}

fn addr(p: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(p[0], p[1], p[2], host)
}

/// The segment's IPv6 ULA for `host`, with its prefix length: `fd7e:a:b::host/64`.
fn ula(p: [u8; 3], host: u8) -> String {
    format!("fd7e:{:x}:{:x}::{host:x}/64", p[1], p[2])
}

/// A `10.a.b.0/24` no interface of the host uses, chosen from this process's pid so that
/// concurrent test processes rarely try the same one first.
fn free_prefix() -> Result<[u8; 3]> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map_err(|_| Error::MissingTool {
            tool: "ip".into(),
            hint: "install iproute2".into(),
        })?;
    let taken = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = std::process::id();
    for i in 0..4096u32 {
        let n = start.wrapping_add(i);
        let p = [10, 100 + (n % 100) as u8, ((n / 100) % 256) as u8];
        if !taken.contains(&format!("inet {}.{}.{}.", p[0], p[1], p[2])) {
            return Ok(p);
        }
    }
    Err(Error::Command {
        command: "choose a segment subnet".into(),
        detail: "every candidate 10.x.y.0/24 is in use on this host".into(),
    })
}

fn start_dnsmasq(ns: &NetNs, p: [u8; 3], dir: &Path, ipv6: bool) -> Result<Process> {
    let dnsmasq = crate::rootfs::which("dnsmasq", "install dnsmasq-base (cargo xtask deps does)")?;
    let leases = dir.join("dnsmasq.leases");
    let mut cmd = ns.command(dnsmasq);
    cmd.args([
        "--keep-in-foreground",
        "--log-dhcp",
        "--log-facility=-",
        "--no-resolv",
        "--no-hosts",
    ])
    // Also the segment's DNS server (handed out by DHCP, as a site's would be): with no
    // upstream it knows no names, but nodes get a real resolv.conf from it, which CoreDNS
    // needs to start (it refuses an upstream list with no servers).
    .arg(format!("--interface={BRIDGE}"))
    .arg("--bind-interfaces")
    .arg(format!(
        "--dhcp-range={},{},255.255.255.0,1h",
        addr(p, 100),
        addr(p, 199)
    ))
    // The host is the segment's router and NTP server, as a site's gateway would be.
    .arg(format!("--dhcp-option=option:router,{}", addr(p, 1)))
    .arg(format!("--dhcp-option=option:ntp-server,{}", addr(p, 1)))
    .arg("--no-ping")
    .arg(format!("--dhcp-leasefile={}", leases.display()))
    .arg("--pid-file=");
    if ipv6 {
        // Router advertisements of the bridge's prefix, answering solicitations at once;
        // lifetime 0: nobody's default route.
        cmd.arg("--enable-ra")
            .arg(format!("--dhcp-range=::,constructor:{BRIDGE},ra-only,64"))
            .arg(format!("--ra-param={BRIDGE},60,0"));
    }
    let log = dir.join("dnsmasq.log");
    let mut proc = Process::spawn("dnsmasq", cmd, &log)?;
    // dnsmasq logs "started" once its sockets are bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !proc.log_tail(50).contains("started") {
        proc.check_running()?;
        if std::time::Instant::now() > deadline {
            return Err(Error::NotReady {
                component: "dnsmasq".into(),
                seconds: 10,
                reason: "no start message".into(),
                log_tail: proc.log_tail(20),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(proc)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|_| Error::MissingTool {
        tool: "ip".into(),
        hint: "install iproute2".into(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("{cmd:?}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
