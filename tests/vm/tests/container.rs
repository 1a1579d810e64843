//! A node as a systemd-nspawn container in its own network namespace, driven over D-Bus by
//! the agent's systemd client; and the namespace plumbing with its leftover cleanup.

use std::process::Command;

use tether_agent::Error as AgentError;
use tether_testkit::nspawn::ContainerOptions;
use tether_testkit::rootfs::{self, MINIMAL_SYSTEMD};
use tether_testkit::{Container, NetNs};
use tether_vm_tests::{UNIT_TIMEOUT, oneshot_unit};

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_in_netns_starts_unit_over_dbus() {
    let root = rootfs::ensure(&MINIMAL_SYSTEMD).expect("build or reuse the minimal rootfs");

    // A "LAN" namespace with a bridge and a tap (where a qemu NIC would plug in), and a node
    // namespace wired to the bridge by a veth pair.
    let lan = NetNs::create().expect("create lan netns");
    lan.add_bridge("br0", Some("10.77.0.1/24")).expect("bridge");
    lan.add_tap("tap0", Some("br0")).expect("tap on bridge");
    let node = NetNs::create().expect("create node netns");
    lan.add_veth("vn0", "host0", Some(&node), Some("br0"))
        .expect("veth lan<->node");
    node.add_address("host0", "10.77.0.2/24").expect("address");
    let links = lan.links().expect("list links");
    for want in ["br0", "tap0", "vn0"] {
        assert!(
            links.iter().any(|l| l == want),
            "{want} missing from {links:?}"
        );
    }
    node.exec("ip", &["link", "show", "host0"])
        .expect("peer moved into node netns");

    let container = Container::boot(
        &root,
        ContainerOptions {
            netns: Some(&node),
            ..Default::default()
        },
    )
    .await
    .expect("boot the rootfs under systemd-nspawn");
    let systemd = container.systemd();

    container
        .write_file(
            "/etc/systemd/system/tether-probe.service",
            &oneshot_unit("probe", "ip -o addr show dev host0 > /run/probe.out"),
        )
        .expect("write unit");
    container
        .write_file(
            "/etc/systemd/system/tether-broken.service",
            &oneshot_unit("fails on purpose", "exit 3"),
        )
        .expect("write unit");
    systemd.reload().await.expect("daemon-reload over D-Bus");

    systemd
        .start_unit("tether-probe.service", UNIT_TIMEOUT)
        .await
        .expect("StartUnit + JobRemoved(done)");
    assert_eq!(
        systemd.active_state("tether-probe.service").await.unwrap(),
        "active"
    );
    let out = std::fs::read_to_string(container.path("/run/probe.out")).expect("unit output");
    assert!(
        out.contains("10.77.0.2/24"),
        "the unit ran inside the node namespace: {out}"
    );

    // Failures come back as errors, not as silent successes.
    match systemd
        .start_unit("tether-broken.service", UNIT_TIMEOUT)
        .await
    {
        Err(AgentError::JobFailed { result, .. }) => assert_eq!(result, "failed"),
        other => panic!("expected JobFailed, got {other:?}"),
    }
    assert!(
        systemd
            .start_unit("no-such-unit.service", UNIT_TIMEOUT)
            .await
            .is_err(),
        "starting a unit that does not exist fails"
    );

    let (lan_name, node_name) = (lan.name().to_string(), node.name().to_string());
    drop(container);
    drop(node);
    drop(lan);
    assert!(
        !netns_exists(&lan_name) && !netns_exists(&node_name),
        "namespaces removed on drop"
    );
}

#[test]
fn leftovers_of_a_killed_run_are_removed() {
    // What a killed test run leaves: a namespace and a process group whose recorded owner is
    // dead (pid 4194303 exceeds pid_max, so it can never be alive).
    let state = tether_testkit::state::state_dir();
    let name = format!("tt-dead-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success()
    );
    std::fs::create_dir_all(state.join("netns")).unwrap();
    std::fs::write(state.join("netns").join(&name), "4194303 1").unwrap();

    let mut sleeper = {
        use std::os::unix::process::CommandExt;
        Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .unwrap()
    };
    std::fs::create_dir_all(state.join("pgid")).unwrap();
    std::fs::write(
        state.join("pgid").join(sleeper.id().to_string()),
        "4194303 1",
    )
    .unwrap();

    tether_testkit::state::reap_stale();

    assert!(!netns_exists(&name), "stale namespace removed");
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "stale process group killed: {status}");
    assert!(!state.join("netns").join(&name).exists(), "record removed");
}
