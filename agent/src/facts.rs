//! Facts about the machine (DMI UUID, NICs, CPUs, memory, disks, boot mode and slot), read
//! from `/sys` and `/proc` below a `root` so tests can hand in a tree.
//!
//! Two decisions: inside a container (systemd's `/run/systemd/container` exists) the DMI
//! UUID describes the host, not this machine, so none is reported — two containers would
//! otherwise claim one identity. And the boot MAC is the one tether-pxe put on the command
//! line, else the NIC holding the default route, else the first NIC by name: the MAC a
//! re-enrolling machine is recognised by.

use std::path::Path;

use tether_api::machine::{Disk, Facts, Nic};
use tether_boot::{BootParams, Mac};

use crate::inputs::under;

fn read(root: &Path, path: &str) -> Option<String> {
    std::fs::read_to_string(under(root, path))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn entries(root: &Path, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(under(root, dir))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Whether we run in a container (systemd's own marker).
pub fn in_container(root: &Path) -> bool {
    under(root, "/run/systemd/container").exists()
}

/// One network link as the kernel reports it in this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface name.
    pub name: String,
    /// Its MAC, if it has one.
    pub mac: Option<Mac>,
    /// Its addresses with prefix length.
    pub addresses: Vec<String>,
}

/// Gathers the facts below `root`, with `links` from [`live_links`] (or a test's list).
pub fn gather(root: &Path, boot: &BootParams, links: &[Link]) -> Facts {
    let container = in_container(root);
    let nics = nics(root, container, links);
    let boot_mac = boot
        .mac
        .map(|m| m.to_string())
        .or_else(|| default_route_mac(root, &nics))
        .or_else(|| nics.first().map(|n| n.mac.clone()));
    Facts {
        uuid: if container {
            None
        } else {
            read(root, "/sys/class/dmi/id/product_uuid")
                .map(|u| u.to_ascii_lowercase())
                .filter(|u| is_identity(u))
        },
        boot_mac,
        nics,
        cpus: read(root, "/proc/cpuinfo")
            .map(|c| c.lines().filter(|l| l.starts_with("processor")).count() as u32)
            .unwrap_or(0),
        memory_bytes: read(root, "/proc/meminfo")
            .and_then(|m| mem_total(&m))
            .unwrap_or(0),
        disks: disks(root),
        boot_mode: if under(root, "/sys/firmware/efi").exists() {
            "uefi".into()
        } else {
            "bios".into()
        },
        boot_slot: boot.slot.map(|s| s.to_string()),
        kernel: read(root, "/proc/sys/kernel/osrelease").unwrap_or_default(),
        product: match (
            read(root, "/sys/class/dmi/id/sys_vendor"),
            read(root, "/sys/class/dmi/id/product_name"),
        ) {
            (Some(v), Some(p)) => Some(format!("{v} {p}")),
            (v, p) => v.or(p),
        },
    }
}

/// Firmware without a real UUID reports all zeros or all ones: not an identity.
pub fn is_identity(uuid: &str) -> bool {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    !hex.chars().all(|c| c == '0') && !hex.chars().all(|c| c == 'f')
}

/// `MemTotal:  2035280 kB` → bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Ethernet NICs: every link with a MAC but loopback — on a machine only those backed by a
/// device (`/sys/class/net/<name>/device`), in a container all of them (its NICs are virtual
/// by nature, and its `/sys` may even show the host's network). MACs and addresses come from
/// the kernel's own answer in this network namespace, never from `/sys`.
fn nics(root: &Path, container: bool, links: &[Link]) -> Vec<Nic> {
    let mut nics: Vec<Nic> = links
        .iter()
        .filter(|l| l.name != "lo")
        .filter(|l| container || under(root, &format!("/sys/class/net/{}/device", l.name)).exists())
        .filter_map(|l| {
            let mac = l.mac.filter(|m| m.0 != [0; 6])?;
            Some(Nic {
                name: l.name.clone(),
                mac: mac.to_string(),
                addresses: l.addresses.clone(),
            })
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// The interface of the IPv4 default route in `/proc/net/route`.
pub fn default_route_interface(route_table: &str) -> Option<&str> {
    route_table.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let iface = f.next()?;
        (f.next()? == "00000000").then_some(iface)
    })
}

fn default_route_mac(root: &Path, nics: &[Nic]) -> Option<String> {
    let table = read(root, "/proc/net/route")?;
    let iface = default_route_interface(&table)?;
    nics.iter().find(|n| n.name == iface).map(|n| n.mac.clone())
}

fn disks(root: &Path) -> Vec<Disk> {
    const SKIP: &[&str] = &["loop", "ram", "zram", "dm-", "sr", "nbd", "fd"];
    entries(root, "/sys/block")
        .into_iter()
        .filter(|n| !SKIP.iter().any(|p| n.starts_with(p)))
        .filter_map(|name| {
            let sectors: u64 = read(root, &format!("/sys/block/{name}/size"))?
                .parse()
                .ok()?;
            Some(Disk {
                model: read(root, &format!("/sys/block/{name}/device/model")),
                size_bytes: sectors * 512,
                name,
            })
        })
        .filter(|d| d.size_bytes > 0)
        .collect()
}

/// Every link of this network namespace with its MAC and addresses (`getifaddrs`).
pub fn live_links() -> Vec<Link> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut links: Vec<Link> = Vec::new();
    for a in addrs {
        let idx = match links.iter().position(|l| l.name == a.interface_name) {
            Some(i) => i,
            None => {
                links.push(Link {
                    name: a.interface_name.clone(),
                    mac: None,
                    addresses: Vec::new(),
                });
                links.len() - 1
            }
        };
        let Some(addr) = a.address else { continue };
        if let Some(ll) = addr.as_link_addr() {
            if let Some(m) = ll.addr() {
                links[idx].mac = Some(Mac(m));
            }
        } else if let Some(v4) = addr.as_sockaddr_in() {
            let bits = a
                .netmask
                .and_then(|m| m.as_sockaddr_in().map(|s| u32::from(s.ip()).count_ones()))
                .unwrap_or(32);
            links[idx].addresses.push(format!("{}/{bits}", v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let bits = a
                .netmask
                .and_then(|m| m.as_sockaddr_in6().map(|s| u128::from(s.ip()).count_ones()))
                .unwrap_or(128);
            links[idx].addresses.push(format!("{}/{bits}", v6.ip()));
        }
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, path: &str, text: &str) {
        let p = under(root, path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn link(name: &str, mac: &str, addrs: &[&str]) -> Link {
        Link {
            name: name.into(),
            mac: Some(mac.parse().unwrap()),
            addresses: addrs.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn links() -> Vec<Link> {
        vec![
            Link {
                name: "lo".into(),
                mac: Some(Mac([0; 6])),
                addresses: vec!["127.0.0.1/8".into()],
            },
            link("enp2s0", "52:54:00:00:00:02", &[]),
            link("enp1s0", "52:54:00:00:00:01", &["10.0.0.5/24"]),
            link("br0", "52:54:00:00:00:03", &[]),
        ]
    }

    fn machine() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        put(
            r,
            "/sys/class/dmi/id/product_uuid",
            "4C4C4544-0000-1000-8000-000000000001\n",
        );
        put(r, "/sys/class/dmi/id/sys_vendor", "QEMU\n");
        put(
            r,
            "/sys/class/dmi/id/product_name",
            "Standard PC (i440FX + PIIX, 1996)\n",
        );
        for nic in ["enp1s0", "enp2s0"] {
            std::fs::create_dir_all(under(r, &format!("/sys/class/net/{nic}/device"))).unwrap();
        }
        put(
            r,
            "/proc/cpuinfo",
            "processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\n",
        );
        put(
            r,
            "/proc/meminfo",
            "MemTotal:        2035280 kB\nMemFree: 1 kB\n",
        );
        put(r, "/sys/block/vda/size", "41943040\n");
        put(r, "/sys/block/vda/device/model", "QEMU HARDDISK\n");
        put(r, "/sys/block/loop0/size", "100\n");
        put(r, "/sys/block/sr0/size", "0\n");
        put(r, "/proc/sys/kernel/osrelease", "6.1.0-28-amd64\n");
        put(
            r,
            "/proc/net/route",
            "Iface\tDestination\tGateway\nenp2s0\t0000A8C0\t00000000\nenp2s0\t00000000\t0100A8C0\n",
        );
        t
    }

    #[test]
    fn gathers_a_machine() {
        let t = machine();
        let f = gather(t.path(), &BootParams::default(), &links());
        assert_eq!(
            f.uuid.as_deref(),
            Some("4c4c4544-0000-1000-8000-000000000001")
        );
        assert_eq!(
            f.nics.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["enp1s0", "enp2s0"],
            "device-backed NICs only, sorted"
        );
        assert_eq!(f.nics[0].addresses, ["10.0.0.5/24"]);
        assert_eq!(
            f.boot_mac.as_deref(),
            Some("52:54:00:00:00:02"),
            "the default route's NIC"
        );
        assert_eq!((f.cpus, f.memory_bytes), (2, 2035280 * 1024));
        assert_eq!(f.disks.len(), 1);
        assert_eq!(f.disks[0].size_bytes, 41943040 * 512);
        assert_eq!(f.disks[0].model.as_deref(), Some("QEMU HARDDISK"));
        assert_eq!(f.boot_mode, "bios");
        assert_eq!(f.kernel, "6.1.0-28-amd64");
        assert_eq!(
            f.product.as_deref(),
            Some("QEMU Standard PC (i440FX + PIIX, 1996)")
        );
    }

    #[test]
    fn the_command_line_names_the_boot_mac_and_slot() {
        let t = machine();
        std::fs::create_dir_all(t.path().join("sys/firmware/efi")).unwrap();
        let boot = BootParams::parse("tether.mac=52:54:00:00:00:01 tether.slot=b").unwrap();
        let f = gather(t.path(), &boot, &links());
        assert_eq!(f.boot_mac.as_deref(), Some("52:54:00:00:00:01"));
        assert_eq!(f.boot_slot.as_deref(), Some("b"));
        assert_eq!(f.boot_mode, "uefi");
    }

    #[test]
    fn containers_report_no_uuid_and_their_virtual_nics() {
        let t = machine();
        put(t.path(), "/run/systemd/container", "systemd-nspawn\n");
        put(
            t.path(),
            "/proc/net/route",
            "Iface\tDestination\nhost0\t00000000\n",
        );
        let mut l = links();
        l.push(link("host0", "aa:bb:cc:dd:ee:ff", &["10.9.0.100/24"]));
        let f = gather(t.path(), &BootParams::default(), &l);
        assert_eq!(f.uuid, None);
        assert!(
            f.nics.iter().any(|n| n.name == "host0"),
            "virtual NICs count in a container"
        );
        assert_eq!(f.boot_mac.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
    }

    #[test]
    fn live_links_include_loopback() {
        let l = live_links();
        assert!(
            l.iter()
                .any(|x| x.name == "lo" && x.addresses.iter().any(|a| a == "127.0.0.1/8")),
            "{l:?}"
        );
    }

    #[test]
    fn placeholder_uuids_are_not_identities() {
        assert!(is_identity("4c4c4544-0000-1000-8000-000000000001"));
        assert!(!is_identity("00000000-0000-0000-0000-000000000000"));
        assert!(!is_identity("ffffffff-ffff-ffff-ffff-ffffffffffff"));
        let t = machine();
        put(
            t.path(),
            "/sys/class/dmi/id/product_uuid",
            "00000000-0000-0000-0000-000000000000\n",
        );
        assert_eq!(
            gather(t.path(), &BootParams::default(), &links()).uuid,
            None
        );
    }

    #[test]
    fn parsers() {
        assert_eq!(mem_total("MemTotal: 4 kB\n"), Some(4096));
        assert_eq!(mem_total("nothing"), None);
        assert_eq!(
            default_route_interface("Iface Destination\neth0 00000000 01\n"),
            Some("eth0")
        );
        assert_eq!(
            default_route_interface("Iface Destination\neth0 0000000A 01\n"),
            None
        );
        assert_eq!(default_route_interface(""), None);
    }
}
