//! The konnectivity tunnel (issue 11), on the shared site: a node that reaches its tenant's
//! API and konnectivity ports but accepts no inbound connection — proven: its kubelet port
//! does not answer from the API server's side, and does once the firewall is taken down at
//! the end — still gets `kubectl logs`, `exec -i`, `port-forward` (100 MiB, checksummed), `attach -i`
//! and the API server's pod proxy, through tether-agent's tunnel; the same checks pass with
//! the upstream Go `konnectivity-agent` (the reference) on the same server; a dial to an
//! address outside the tenant is refused; an admission webhook served by a pod on the node
//! decides through the tunnel; a token near its expiry is replaced by the operator; killing
//! konnectivity-server, the agent reconnects and logs work again.

use std::time::{Duration, Instant};

use tether_api::machine::TUNNEL_CONNECTED;
use tether_testkit::NetNs;
use tether_testkit::nspawn::Container;
use tether_vm_tests::node::tunnel::{self, GoAgent};
use tether_vm_tests::node::{self, Tenant, has_condition, nspawn, wait_machine};
use tether_vm_tests::site::{Site, site};

const READY: &str = r#"{.status.conditions[?(@.type=="Ready")].status}"#;

/// A joined nspawn node of tenant `tenant` (pool `<tenant>-workers`) that accepts no
/// inbound connection: its firewall is up before it boots (a rule added later would meet
/// the tunnel's connection mid-stream, where conntrack calls the server's next packet NEW
/// and drops it), so the kubelet port never answers from the API server's side.
struct Firewalled {
    tenant: Tenant,
    node: Container,
    netns: NetNs,
    name: String,
    ip: String,
    client: kube::Client,
}

impl Firewalled {
    async fn start(site: &'static Site, tenant: &'static str) -> Firewalled {
        let t = tokio::task::spawn_blocking(move || Tenant::create(site, tenant))
            .await
            .unwrap();
        node::fill_store(site).await;
        let user_data = site.token(&["create", "--ttl", "15m", "--uses", "1", "--user-data"]);
        let seed = site.seed_dir(&format!("{tenant}-nspawn"), &user_data);
        let mac = site.next_mac();
        let name = node::machine_of(&mac);
        let netns = site.node_netns(&mac);
        tunnel::firewall_inbound(&netns, true);
        let node = nspawn::boot_kubernetes_node(site, &name, &netns, &seed).await;
        tokio::task::block_in_place(|| {
            node::apply_pool(site, tenant, &format!("{tenant}-workers"), 1, None, &[&mac])
        });
        let f = Firewalled {
            tenant: t,
            node,
            netns,
            name,
            ip: String::new(),
            client: site.client().await,
        };
        tokio::task::block_in_place(|| {
            f.tenant.wait(
                &format!("node/{}", f.name),
                READY,
                "True",
                Duration::from_secs(300),
            )
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", f.diag(site)));
        f.tunnel_connected(site, Duration::from_secs(60)).await;
        let ip = f.tenant.node_ip(&f.name);
        assert!(
            !tunnel::reachable(&format!("{ip}:10250")),
            "the firewalled node's kubelet port is not reachable from the API server's side"
        );
        Firewalled { ip, ..f }
    }

    /// Waits until the Machine says the tunnel holds every server.
    async fn tunnel_connected(&self, site: &Site, timeout: Duration) {
        wait_machine(&self.client, &self.name, timeout, |m| {
            has_condition(m, TUNNEL_CONNECTED, "True")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.diag(site)));
    }

    fn diag(&self, site: &Site) -> String {
        format!(
            "--- agent ---\n{}\n--- operator ---\n{}",
            self.node.journal("tether-agent", 60),
            site.operator_log()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_reaches_a_node_that_accepts_no_connection_through_the_tunnel() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let f = Firewalled::start(site, "tunnel").await;
    let (tenant, node, netns, name, ip) = (&f.tenant, &f.node, &f.netns, &f.name, &f.ip);
    let diag = || f.diag(site);

    // Through tether-agent.
    tokio::task::block_in_place(|| {
        tunnel::deploy_tools(site, tenant, "tunnel-rust", name);
        let m = or_diag(|| tunnel::check_all(tenant, "tunnel-rust"), diag);
        eprintln!(
            "tunnel: tether-agent port-forward {:.1} MB/s",
            m.forward_mb_s
        );
    });

    // The reference: the upstream Go agent on the same server, tether-agent stopped.
    node.systemd()
        .stop_unit("tether-agent.service", Duration::from_secs(30))
        .await
        .unwrap();
    let go = GoAgent::start(site, tenant, netns, name, ip);
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while tenant
            .kubectl(&["logs", "tunnel-rust", "-c", "web"])
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the Go agent never served logs:\n{}",
                go.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        tunnel::deploy_tools(site, tenant, "tunnel-go", name);
        let m = tunnel::check_all(tenant, "tunnel-go");
        eprintln!(
            "tunnel: upstream Go agent port-forward {:.1} MB/s",
            m.forward_mb_s
        );
    });
    go.stop();
    node.systemd()
        .start_unit("tether-agent.service", Duration::from_secs(30))
        .await
        .unwrap();
    tokio::task::block_in_place(|| logs_work_within(tenant, Duration::from_secs(60)))
        .unwrap_or_else(|e| panic!("{e}\n{}", diag()));

    // A dial outside the tenant — the site's machine API, on the management side — is
    // refused by the agent, not made.
    tokio::task::block_in_place(|| refused_outside(site, tenant, node));

    // An admission webhook in a pod on the node, called at its Service's ClusterIP.
    tokio::task::block_in_place(|| {
        tunnel::deploy_webhook(site, tenant, name);
        or_diag(|| tunnel::check_webhook(tenant), diag);
    });

    // A token nearing its expiry is replaced in the join. (That the next connect uses it is
    // not told apart here: the old token stays valid until its real expiry.)
    renew_soon(&f.client, name).await;

    // konnectivity-server killed: the agent reconnects and logs work again.
    let pidfile = tunnel::konnectivity_pidfile(site, tenant);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    // SAFETY: kill(2) on the pid the tenant's pidfile records.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    tokio::task::block_in_place(|| logs_work_within(tenant, Duration::from_secs(60)))
        .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    eprintln!(
        "tunnel: konnectivity-server SIGKILL -> logs work again {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    f.tunnel_connected(site, Duration::from_secs(30)).await;

    // The firewall was what kept the API server's side out: without it the port answers.
    tunnel::firewall_inbound(netns, false);
    assert!(
        tunnel::reachable(&format!("{ip}:10250")),
        "the kubelet answers once the firewall is down"
    );
}

/// The tunnel token in Machine `machine`'s join Secret.
async fn tunnel_token(client: &kube::Client, machine: &str) -> String {
    let join = join_of(client, machine).await;
    join["tunnel"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn join_of(client: &kube::Client, machine: &str) -> serde_json::Value {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), "tether-system");
    let s = secrets
        .get(&format!("tether-join-{machine}"))
        .await
        .unwrap();
    serde_json::from_slice(&s.data.unwrap()["join.json"].0).unwrap()
}

/// Makes Machine `machine`'s tunnel token look ten minutes from expiry (as if it had lived
/// fifty) and waits until the operator has put a new one in its join.
async fn renew_soon(client: &kube::Client, machine: &str) {
    use base64::Engine;
    let mut join = join_of(client, machine).await;
    let old = join["tunnel"]["token"].as_str().unwrap().to_string();
    let soon = time::OffsetDateTime::now_utc() + time::Duration::minutes(10);
    join["tunnel"]["tokenExpires"] = serde_json::json!(
        soon.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), "tether-system");
    let patch = serde_json::json!({"data": {"join.json":
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&join).unwrap())}});
    secrets
        .patch(
            &format!("tether-join-{machine}"),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let started = Instant::now();
    while tunnel_token(client, machine).await == old {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the operator did not renew a token ten minutes from expiry"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "tunnel: token renewed {:.1} s after it came within 30 min of expiry",
        started.elapsed().as_secs_f64()
    );
}

/// `f()`, printing `diag()` first if it panics.
fn or_diag<T>(f: impl FnOnce() -> T, diag: impl Fn() -> String) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}", diag());
            std::panic::resume_unwind(e)
        }
    }
}

/// Polls `kubectl logs` until it works.
fn logs_work_within(tenant: &Tenant, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match tenant.kubectl(&["logs", "tunnel-rust", "-c", "web"]) {
            Ok(l) if l.contains("tunnel log line") => return Ok(()),
            other if Instant::now() > deadline => {
                return Err(format!("logs after {timeout:?}: {other:?}"));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A Node object naming the site's machine API (outside the tenant) as its address: the API
/// server's proxy to that "kubelet" goes into the tunnel (no agent announces the address,
/// so any agent of the tenant gets the dial), and the agent refuses it.
fn refused_outside(site: &Site, tenant: &Tenant, node: &Container) {
    let hostport = site
        .api_url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let file = site.dir.join("outside-node.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: outside-probe}}\n\
             status:\n  addresses: [{{type: InternalIP, address: \"{host}\"}}]\n\
             \x20 daemonEndpoints: {{kubeletEndpoint: {{Port: {port}}}}}\n"
        ),
    )
    .unwrap();
    tenant
        .kubectl(&["create", "-f", &file.display().to_string()])
        .unwrap();
    let got = tenant.kubectl(&["get", "--raw", "/api/v1/nodes/outside-probe/proxy/"]);
    let _ = tenant.kubectl(&["delete", "node", "outside-probe"]);
    let err = got.expect_err("a dial to the management side went through the tunnel");
    assert!(
        err.contains("tether-agent: dial") && err.contains("refused"),
        "the API server reports the agent's refusal: {err}"
    );
    let journal = node.journal("tether-agent", 200);
    assert!(
        journal.contains(&format!("tether-agent: dial {hostport} refused")),
        "the agent logged refusing {hostport}:\n{journal}"
    );
    eprintln!("tunnel: dial to {hostport} refused: {}", err.trim());
}

/// `cargo xtask bench tunnel`: tether-agent against the upstream Go agent on the same
/// server, node and pod, in one run — port-forward throughput, the API server's pod proxy
/// latency (a dial through the tunnel per request) with 1 and 64 concurrent streams, and the
/// agent's resident memory under that load. Prints `bench:` lines the xtask collects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo xtask bench tunnel"]
async fn bench_tunnel() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let f = Firewalled::start(site, "tunnel-bench").await;
    tokio::task::block_in_place(|| tunnel::deploy_tools(site, &f.tenant, "bench", &f.name));
    let rust = tunnel::pid_in(&f.netns, "tether-agent").expect("tether-agent's pid");
    measure(&f, "tether", rust).await;
    f.node
        .systemd()
        .stop_unit("tether-agent.service", Duration::from_secs(30))
        .await
        .unwrap();
    let go = GoAgent::start(site, &f.tenant, &f.netns, &f.name, &f.ip);
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while f.tenant.kubectl(&["logs", "bench", "-c", "web"]).is_err() {
            assert!(Instant::now() < deadline, "Go agent:\n{}", go.log_tail(30));
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    measure(&f, "upstream-go", go.pid()).await;
    go.stop();
}

/// One agent's figures, printed as one `bench: {json}` line.
async fn measure(f: &Firewalled, agent: &str, pid: u32) {
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(tunnel::rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let idle = tunnel::rss_kib(pid);
    let tenant = f.tenant.client().await;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (_, bytes, secs) =
            tokio::task::block_in_place(|| tunnel::port_forward_get(&f.tenant, "bench", "/big"));
        rates.push(bytes as f64 / 1e6 / secs);
    }
    rates.sort_by(f64::total_cmp);
    let mut latency = Vec::new();
    for (streams, total) in [(1usize, 200usize), (64, 1280)] {
        let (p50, p99) = tunnel::proxy_latency(&tenant, "bench", streams, total).await;
        latency.push(serde_json::json!({"streams": streams, "requests": total, "p50_ms": p50, "p99_ms": p99}));
    }
    sampling.abort();
    let line = serde_json::json!({
        "agent": agent,
        "forward_mb_s": rates,
        "latency": latency,
        "rss_kib_idle": idle,
        "rss_kib_peak": peak.load(std::sync::atomic::Ordering::Relaxed),
    });
    println!("bench: {line}");
}
