//! The boot segment as a machine sees it: the site's router advertisements reach a machine
//! on the bridge (iPXE boots only once its IPv6 configuration is done); the host and the
//! nodes' own namespaces take no address from them.

use std::time::{Duration, Instant};

use tether_testkit::segment::Segment;

#[test]
fn a_machine_hears_the_router_advertisements_the_host_and_the_nodes_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let seg = Segment::create(dir.path()).unwrap();
    let node = seg.add_node_netns("52:54:00:7e:0f:01").unwrap();
    // A node's namespace takes nothing from the advertisements (its networkd config is
    // IPv4-only)…
    let sysctl = |name: &str| {
        let path = format!("/proc/sys/net/ipv6/conf/eth0/{name}");
        node.exec("cat", &[&path]).unwrap().trim().to_string()
    };
    assert_eq!(
        (sysctl("accept_ra"), sysctl("autoconf")),
        ("0".into(), "0".into())
    );
    // …so stand in for iPXE by turning the kernel's autoconfiguration back on: it
    // solicits on link-up and takes an address from the advertised prefix.
    let on = "echo 1 > /proc/sys/net/ipv6/conf/eth0/accept_ra \
              && echo 1 > /proc/sys/net/ipv6/conf/eth0/autoconf";
    node.exec("sh", &["-c", on]).unwrap();
    node.ip(&["link", "set", "eth0", "down"]).unwrap();
    node.ip(&["link", "set", "eth0", "up"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let addrs = loop {
        let a = node
            .ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])
            .unwrap();
        if a.contains("inet6 fd7e:") {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no address from a router advertisement in 30 s; eth0: {a:?}; dnsmasq: {}",
            seg.dhcp_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(addrs.contains("/64"), "{addrs}");
    // Lifetime 0: the segment's advertisements make nobody's default route.
    let routes = node.ip(&["-6", "route", "show", "default"]).unwrap();
    assert!(
        routes.trim().is_empty(),
        "a default route appeared: {routes}"
    );

    let host = std::process::Command::new("ip")
        .args(["-6", "-o", "addr", "show", "dev", seg.uplink()])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(host.trim().is_empty(), "the host's uplink has IPv6: {host}");
}
