//! The agent SIGKILLed at points spread over every named step of install and join (issue
//! 10): each kill logs the step it hit, the test fails unless every step was hit, and the
//! node still converges to a Ready Node without any binary crossing the wire in full twice.
//! The agent's pause hook holds each step just after it is announced, so most kills land
//! at a step's start, after everything before it was done; every other Download kill lands
//! past the pause, while bytes flow. (Kills inside the fast steps' own work — a file
//! rename, a D-Bus job — are not aimed at; a kill in the middle of a wipe is not tested.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether_api::MachinePhase;
use tether_vm_tests::node::{self, Tenant, nspawn};
use tether_vm_tests::site::site;

/// The steps of `tether_agent::node::install::Step`, as the agent logs them.
const STEPS: [&str; 9] = [
    "Marker",
    "Download",
    "Configure",
    "Containerd",
    "Pause",
    "Kubelet",
    "Certificate",
    "Network",
    "Ready",
];
/// The agent's pause after each step it announces: long enough that the journal's delay
/// (it reaches the test through `journalctl -f` in the container) still lands a kill inside
/// the step.
const PAUSE_MS: u64 = 1000;
const KILLS: usize = 27;

/// The step a journal line announces.
fn step_of(line: &str) -> Option<&'static str> {
    let rest = line.split("node step=").nth(1)?;
    STEPS.iter().copied().find(|s| rest.starts_with(s))
}

/// SIGKILLs the agent's main process inside the container whose init is `leader`.
fn sigkill_agent(leader: &str) {
    let out = Command::new("nsenter")
        .args(["-t", leader, "-a", "sh", "-c"])
        .arg("kill -9 $(systemctl show -p MainPID --value tether-agent)")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kill the agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_killed_in_every_join_step_converges() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let _store = node::fill_store(site).await;
    let tenant = tokio::task::spawn_blocking(move || Tenant::create(site, "kills"))
        .await
        .unwrap();
    let user_data = site.token(&["create", "--ttl", "15m", "--uses", "1", "--user-data"]);
    let seed = site.seed_dir("kills-nspawn", &user_data);
    let mac = site.next_mac();
    let name = node::machine_of(&mac);
    let netns = site.node_netns(&mac);
    let node = nspawn::boot_kubernetes_node(site, &name, &netns, &seed).await;
    // The agent pauses after announcing each step (its documented test hook), and may be
    // started as often as the test kills it.
    node.write_file(
        "/etc/systemd/system/tether-agent.service.d/pause.conf",
        &format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nEnvironment={}={PAUSE_MS}\n",
            tether_agent::enroll::PAUSE_ENV
        ),
    )
    .unwrap();
    let systemd = node.systemd();
    systemd.reload().await.unwrap();
    systemd
        .restart_unit("tether-agent.service", tether_vm_tests::UNIT_TIMEOUT)
        .await
        .unwrap();
    // The agent's journal, line by line, from the container.
    let leader = node
        .path("/")
        .to_string_lossy()
        .split('/')
        .nth(2)
        .unwrap()
        .to_string();
    let mut follow = Command::new("nsenter")
        .args([
            "-t",
            &leader,
            "-a",
            "journalctl",
            "-f",
            "-n",
            "0",
            "-o",
            "cat",
        ])
        .args(["-u", "tether-agent"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    let out = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    tokio::task::block_in_place(|| node::apply_pool(site, "kills", "killed", 1, None, &[&mac]));

    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut hits: Vec<&str> = Vec::new();
    for i in 0..KILLS {
        let target = STEPS[i % STEPS.len()];
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last = None;
        while last != Some(target) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) => last = step_of(&l).or(last),
                Err(_) => panic!(
                    "kill {i}: no `node step={target}` in 180 s (last {last:?})\n{}",
                    node.journal("tether-agent", 40)
                ),
            }
        }
        // Early inside the step's pause, or (downloads, every other time) past it, while
        // bytes flow.
        let delay = if target == "Download" && i % 2 == 1 {
            PAUSE_MS + rand(400)
        } else {
            rand(PAUSE_MS / 2)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        sigkill_agent(&leader);
        // Lines the agent wrote before it died still arrive; they decide the step hit.
        while let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) {
            last = step_of(&l).or(last);
        }
        let hit = last.unwrap();
        eprintln!("kill {i:2}: aimed at {target:11} hit {hit:11} after {delay:3} ms");
        hits.push(hit);
        systemd
            .restart_unit("tether-agent.service", tether_vm_tests::UNIT_TIMEOUT)
            .await
            .unwrap();
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let distinct: BTreeSet<&str> = hits.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        STEPS.len(),
        "every step was hit at least once: {hits:?}"
    );

    // Undisturbed, it converges.
    let client = site.client().await;
    let machines: kube::Api<tether_api::Machine> = kube::Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let m = machines.get(&name).await.unwrap();
        if m.status.as_ref().map(|s| s.phase) == Some(MachinePhase::Ready) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not Ready after the kills: {:?}\n{}",
            m.status,
            node.journal("tether-agent", 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tenant
        .wait(
            &format!("node/{name}"),
            r#"{.status.conditions[?(@.type=="Ready")].status}"#,
            "True",
            Duration::from_secs(60),
        )
        .unwrap();

    // No binary crossed the wire in full twice: per blob, at most one answer carried all of
    // it; what a kill interrupted was resumed with Range requests (206).
    let mut statuses: BTreeMap<String, Vec<(u16, u64)>> = BTreeMap::new();
    for g in node::store_gets(site, &tenant.node_ip(&name)) {
        if g.path.starts_with("/v2/tether/node/") && g.path.contains("/blobs/") {
            statuses
                .entry(g.path)
                .or_default()
                .push((g.status, g.bytes));
        }
    }
    eprintln!("store requests per blob: {statuses:#?}");
    assert_eq!(statuses.len(), tether_upstream::NODE_COMPONENTS.len());
    let blobs = site
        .dir
        .join("standalone/registry/data/docker/registry/v2/blobs/sha256");
    for (blob, s) in &statuses {
        let hex = blob.rsplit("sha256:").next().unwrap();
        let size = std::fs::metadata(blobs.join(&hex[..2]).join(hex).join("data"))
            .unwrap()
            .len();
        let complete = s.iter().filter(|x| **x == (200, size)).count();
        assert!(complete <= 1, "{blob} sent in full {complete} times: {s:?}");
    }
}
