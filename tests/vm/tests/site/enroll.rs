//! Machines enroll (issue 8), on the shared site ([`tether_vm_tests::site`]): a qemu VM
//! that PXE-boots the image built by tether-image from tether-pxe in proxyDHCP mode next to
//! the site's own DHCP server; an nspawn node of the same image that enrolls through a
//! NoCloud seed directory with a pool token; and the agent killed (SIGKILL) in every phase
//! of enrollment, which must always end enrolled as exactly one Machine.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams};
use tether_api::machine::MAC_LABEL;
use tether_api::token::{TokenRecord, secret_name};
use tether_api::{Machine, MachinePhase};
use tether_boot::Mac;
use tether_vm_tests::site::{Site, site};

/// Waits until the Machine labelled with `mac` is Enrolled and has facts.
async fn wait_enrolled(
    site: &Site,
    mac: &str,
    timeout: Duration,
    diag: impl Fn() -> String,
) -> Machine {
    let client = site.client().await;
    let api: Api<Machine> = Api::all(client);
    let m: Mac = mac.parse().unwrap();
    let lp = ListParams::default().labels(&format!("{MAC_LABEL}={}", m.dashed()));
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(list) = api.list(&lp).await
            && let Some(machine) = list.items.into_iter().find(|x| {
                x.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MachinePhase::Enrolled && s.facts.is_some())
            })
        {
            return machine;
        }
        assert!(
            Instant::now() < deadline,
            "no Enrolled Machine for {mac} after {timeout:?}\n{}",
            diag()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxe_booted_vm_enrolls_through_proxy_dhcp() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let mac = site.next_mac();
    let vm = site.pxe_vm("pxe-enroll", &mac);
    let machine = wait_enrolled(site, &mac, Duration::from_secs(420), || {
        format!(
            "--- console ---\n{}\n--- tether-pxe ---\n{}\n--- site DHCP ---\n{}\n--- operator ---\n{}",
            tether_testkit::qemu::tail(&vm.console(), 40),
            site.pxe_log(),
            site.dhcp_log(),
            site.operator_log()
        )
    })
    .await;
    let took = vm.elapsed();
    eprintln!("qemu power-on → Machine Enrolled: {took:.1?}");
    let console = vm.console();
    assert!(
        console.contains("tether-initramfs: rootfs verified"),
        "booted the verified image"
    );
    let failed: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("Failed to start"))
        .collect();
    assert!(
        failed.is_empty(),
        "no unit of the image failed:\n{}",
        failed.join("\n")
    );
    let st = machine.status.unwrap();
    let facts = st.facts.unwrap();
    assert_eq!(
        facts.boot_mac.as_deref(),
        Some(mac.as_str()),
        "the MAC tether-pxe put on the command line"
    );
    assert!(facts.cpus >= 1 && facts.memory_bytes > 1 << 30, "{facts:?}");
    assert_eq!(facts.boot_mode, "bios");
    assert_eq!(
        facts.uuid,
        Some(Site::uuid_of(&mac)),
        "the VM's SMBIOS UUID"
    );
    assert!(facts.disks.is_empty(), "diskless");
    assert!(
        st.last_seen.is_some(),
        "the enrollment is recorded as a sighting"
    );
    // The boot token was minted for this MAC, single use, and is spent now.
    let m: Mac = mac.parse().unwrap();
    let tokens = site
        .kubectl(&[
            "-n",
            "tether-system",
            "get",
            "secrets",
            "-l",
            "tether.dev/token-kind=boot",
            "-o",
            "name",
        ])
        .unwrap();
    let mut spent_for_me = 0;
    let client = site.client().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "tether-system");
    for name in tokens.lines() {
        let name = name.trim_start_matches("secret/");
        let rec = TokenRecord::from_secret(&secrets.get(name).await.unwrap()).unwrap();
        if rec.mac == Some(m) && rec.uses_left == Some(0) {
            spent_for_me += 1;
            assert_eq!(rec.spent.len(), 1);
        }
    }
    assert_eq!(
        spent_for_me, 1,
        "exactly one boot token of this MAC was spent:\n{tokens}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nspawn_node_enrolls_through_nocloud_with_a_pool_token() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let user_data = site.token(&[
        "create",
        "--ttl",
        "15m",
        "--uses",
        "1",
        "--pool",
        "team-a/workers",
        "--user-data",
    ]);
    let seed_dir = site.seed_dir("nspawn-1", &user_data);
    let mac = site.next_mac();
    let netns = site.node_netns(&mac);
    let started = Instant::now();
    let node = site.nspawn_node(&netns, Some(&seed_dir)).await;
    let machine = wait_enrolled(site, &mac, Duration::from_secs(120), || {
        format!(
            "--- node: tether-agent ---\n{}\n--- node: networkd ---\n{}\n--- operator ---\n{}",
            node.journal("tether-agent", 40),
            node.journal("systemd-networkd", 20),
            site.operator_log()
        )
    })
    .await;
    eprintln!("nspawn boot → Machine Enrolled: {:.1?}", started.elapsed());
    assert_eq!(
        machine.spec.pool.as_deref(),
        Some("team-a/workers"),
        "the token's pool"
    );
    let facts = machine.status.unwrap().facts.unwrap();
    assert_eq!(facts.uuid, None, "a container reports no DMI UUID");
    let agent_log = node.journal("tether-agent", 400);
    assert!(agent_log.contains("NoCloud seed directory"), "{agent_log}");
    // The key stayed on the node, private.
    let key = node.path("/var/lib/tether/machine.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// A VM booted without any enrollment words finds its seed on a vfat volume labelled
/// `CIDATA` (cloud-init's NoCloud disk), mounted read-only through udev's by-label link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_enrolls_through_a_nocloud_cidata_volume() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let user_data = site.token(&[
        "create",
        "--ttl",
        "15m",
        "--uses",
        "1",
        "--labels",
        "seed=cidata",
        "--user-data",
    ]);
    let img = site
        .cidata_volume("vm-cidata", &user_data)
        .expect("the cidata volume");
    let mac = site.next_mac();
    let vm = site.direct_vm("cidata", &mac, &img);
    let machine = wait_enrolled(site, &mac, Duration::from_secs(300), || {
        format!(
            "--- console ---\n{}\n--- operator ---\n{}",
            tether_testkit::qemu::tail(&vm.console(), 60),
            site.operator_log()
        )
    })
    .await;
    eprintln!(
        "qemu start → Machine Enrolled through cidata: {:.1?}",
        vm.elapsed()
    );
    let console = vm.console();
    assert!(
        console.contains("NoCloud volume CIDATA"),
        "{}",
        tether_testkit::qemu::tail(&console, 40)
    );
    assert_eq!(
        machine
            .metadata
            .labels
            .unwrap()
            .get("seed")
            .map(String::as_str),
        Some("cidata")
    );
    let facts = machine.status.unwrap().facts.unwrap();
    assert_eq!(facts.uuid, Some(Site::uuid_of(&mac)));
    assert_eq!(
        facts.boot_mac.as_deref(),
        Some(mac.as_str()),
        "the NIC of the default route"
    );
    assert_eq!(facts.disks.len(), 1, "the seed disk: {:?}", facts.disks);
}

/// The agent, killed in every phase of enrollment, always ends enrolled: one Machine, the
/// single-use token spent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_survives_sigkill_in_every_phase() {
    const PHASES: [&str; 5] = ["inputs", "clock", "key", "request", "save"];
    const PAUSE_MS: u64 = 300;
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let agent = tether_vm_tests::image::agent_binary();
    let token = site
        .token(&["create", "--ttl", "30m", "--uses", "1"])
        .trim()
        .to_string();
    let state = site.dir.join("kill-test-state");
    let mut hits: Vec<&str> = Vec::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // `tether-agent enroll` with the site's API, pin, the token and this state directory.
    let enroll = || {
        let mut c = Command::new(&agent);
        c.args([
            "enroll",
            "--api",
            &site.api_url,
            "--ca-pin",
            &site.pin.to_string(),
            "--token",
            &token,
        ])
        .arg("--state-dir")
        .arg(&state);
        c
    };
    let spawn = || {
        enroll()
            .env(tether_agent::enroll::PAUSE_ENV, PAUSE_MS.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for i in 0..25 {
        let target = PHASES[i % PHASES.len()];
        let mut child = spawn();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut last = None;
        let mut lines = stderr.lines();
        // Read until the target phase is announced (or the agent finished first).
        while let Some(Ok(l)) = lines.next() {
            if let Some(p) = PHASES
                .iter()
                .find(|p| l.contains(&format!("enroll phase={p}")))
            {
                last = Some(*p);
                if *p == target {
                    break;
                }
            }
        }
        // Kill somewhere inside the phase: in its pause, or (for the request) past it,
        // while the TLS exchange and the API's work run.
        let delay = if target == "request" && i % 2 == 1 {
            PAUSE_MS + rand(150)
        } else {
            rand(PAUSE_MS)
        };
        std::thread::sleep(Duration::from_millis(delay));
        // What the agent said up to the kill decides the phase hit.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        for l in lines.map_while(Result::ok) {
            if let Some(p) = PHASES
                .iter()
                .find(|p| l.contains(&format!("enroll phase={p}")))
            {
                last = Some(*p);
            }
        }
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "kill {i}: the agent ended on its own ({status}) before the kill"
        );
        let hit = last.expect("the agent announced a phase before it was killed");
        eprintln!("kill {i:2}: aimed at {target:8} hit {hit:8} after {delay:3} ms");
        hits.push(hit);
    }
    let distinct: BTreeSet<&str> = hits.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        PHASES.len(),
        "every phase was hit at least once: {hits:?}"
    );
    assert!(hits.len() >= 20);

    // An undisturbed run ends it.
    let out = enroll().output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        said,
        String::from_utf8_lossy(&out.stderr)
    );
    let machine = said.split_whitespace().last().unwrap().to_string();
    let enrolled: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("machine.json")).unwrap()).unwrap();
    assert_eq!(enrolled["machine"], machine);

    let client = site.client().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "tether-system");
    let id = token.split('.').next().unwrap();
    let rec = TokenRecord::from_secret(&secrets.get(&secret_name(id)).await.unwrap()).unwrap();
    assert_eq!(rec.uses_left, Some(0), "the single-use token was spent");
    assert_eq!(
        rec.spent.len(),
        1,
        "spent once, for one key: {:?}",
        rec.spent
    );
    assert_eq!(rec.spent[0].1, machine);
    let machines: Api<Machine> = Api::all(client);
    let m = machines.get(&machine).await.unwrap();
    let cert = m.status.unwrap().certificate.unwrap();
    assert_eq!(
        cert.pem, enrolled["certificate"],
        "the node holds the certificate on record"
    );
    let same_key = machines
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|x| {
            x.status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some_and(|c| c.key_sha256 == cert.key_sha256)
        })
        .count();
    assert_eq!(same_key, 1, "exactly one Machine carries this node's key");
}
