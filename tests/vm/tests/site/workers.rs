//! WorkerPools join machines (issue 10), on the shared site: a pool of two claims an nspawn
//! machine (enrolled through a NoCloud seed) and a qemu machine that PXE-booted through
//! tether-pxe (TCG, its own kernel, cgroup v2); the agent on each installs the pinned
//! containerd, runc, CNI plugins and kubelet from the store by digest, and joins the tenant
//! through TLS bootstrapping with a per-Machine token, its certificates approved by the
//! operator for that Machine only. Every image is pulled through containerd's mirror from
//! standalone's artifact store; pods reach each other across the nodes over host-gw routes
//! the agents keep from their desired configs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::Api;
use tether_api::{Machine, MachinePhase};
use tether_upstream::Pins;
use tether_vm_tests::node::{self, Tenant, nspawn, wait_machine};
use tether_vm_tests::site::{Site, site};

const READY: &str = r#"{.status.conditions[?(@.type=="Ready")].status}"#;

/// RAM of a qemu node: a diskless node keeps its downloaded runtime, containerd's images
/// and the pods' writable layers in RAM.
const QEMU_MIB: u32 = 2560;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pool_joins_an_nspawn_and_a_pxe_booted_machine() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let started = Instant::now();
    let tenant = tokio::task::spawn_blocking(move || Tenant::create(site, "join"))
        .await
        .unwrap();
    let store = node::fill_store(site).await;
    assert!(
        store.starts_with(&format!("{}:", site.host_ip)),
        "the store listens where nodes reach it: {store}"
    );
    eprintln!("tenant Ready, store filled after {:?}", started.elapsed());

    // The qemu machine first: it is the slow one. It PXE-boots and enrolls with its boot
    // token; the nspawn machine enrolls with a join token from its seed.
    let qmac = site.next_mac();
    let vm = site
        .vm_on_segment("join-qemu", &qmac, QEMU_MIB)
        .args(["-boot", "n"])
        .spawn()
        .expect("start qemu");
    let power_on = Instant::now();
    let qname = node::machine_of(&qmac);
    let user_data = site.token(&["create", "--ttl", "15m", "--uses", "1", "--user-data"]);
    let seed = site.seed_dir("join-nspawn", &user_data);
    let nmac = site.next_mac();
    let nname = node::machine_of(&nmac);
    let netns = site.node_netns(&nmac);
    let node = nspawn::boot_kubernetes_node(site, &nname, &netns, &seed).await;
    let nspawn_on = Instant::now();
    tokio::task::block_in_place(|| {
        node::apply_pool(site, "join", "workers", 2, None, &[&qmac, &nmac])
    });

    let client = site.client().await;
    let q = tokio::spawn(phases(client.clone(), qname.clone(), power_on));
    let n = tokio::spawn(phases(client.clone(), nname.clone(), nspawn_on));
    // The qemu node's own account of its boot and join, from its console.
    let mut vm = vm;
    let marks = tokio::task::block_in_place(|| console_marks(&mut vm));
    let diag = || {
        format!(
            "--- qemu console ---\n{}\n--- nspawn agent ---\n{}\n--- nspawn kubelet ---\n{}\n--- operator ---\n{}",
            tether_testkit::qemu::tail(&vm.console(), 40),
            node.journal("tether-agent", 40),
            node.journal("kubelet", 20),
            site.operator_log()
        )
    };
    let wait = tokio::time::timeout(Duration::from_secs(480), async {
        (q.await.unwrap(), n.await.unwrap())
    });
    let (qphases, nphases) = match wait.await {
        Ok(p) => p,
        Err(_) => panic!("the machines did not both reach Ready in 480 s\n{}", diag()),
    };
    for (what, ph) in [
        ("qemu (TCG), from power-on", &qphases),
        ("nspawn, from boot", &nphases),
    ] {
        eprintln!("machine {what}:");
        for (phase, at) in ph {
            eprintln!("  {at:>9.1?}  {phase:?}");
        }
    }
    for n in [&qname, &nname] {
        tenant
            .wait(&format!("node/{n}"), READY, "True", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    }
    report_bench(site, &tenant, &node, &qname, &qphases, &nphases, &marks);
    tenant
        .wait(
            "wp/workers",
            "{.status.readyReplicas}",
            "2",
            Duration::from_secs(1),
        )
        .or_else(|_| {
            site.kubectl(&[
                "get",
                "wp",
                "workers",
                "-o",
                "jsonpath={.status.readyReplicas}",
            ])
            .map(|r| assert_eq!(r, "2"))
        })
        .unwrap();
    let (nname, qname) = (nname.as_str(), qname.as_str());

    // kube-proxy (DaemonSet) runs on both, CoreDNS (Deployment) is ready, from the store.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let proxy = tenant.kubectl(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "k8s-app=kube-proxy",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName}={.status.phase} {end}",
        ]);
        let dns = tenant.kubectl(&[
            "-n",
            "kube-system",
            "get",
            "deployment",
            "coredns",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ]);
        let proxy_ok = proxy.as_deref().is_ok_and(|p| {
            [nname, qname]
                .iter()
                .all(|n| p.contains(&format!("{n}=Running")))
        });
        if proxy_ok && dns.as_deref() == Ok("2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kube-proxy {proxy:?}, CoreDNS ready {dns:?}\n{}\n{}",
            tenant
                .kubectl(&["get", "pods", "-A", "-o", "wide"])
                .unwrap_or_default(),
            node.journal("kubelet", 30)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "kube-proxy on both nodes and CoreDNS ready after {:?}",
        power_on.elapsed()
    );
    certificates_are_per_machine(&tenant, &[nname, qname]);
    downloads_came_from_the_store_once(site, &tenant, qname);
    a_foreign_serving_address_is_denied(site, &tenant, &node, nname);
    // The desired config's name and time servers are the node's.
    let dns =
        std::fs::read_to_string(node.path("/etc/systemd/resolved.conf.d/50-tether.conf")).unwrap();
    assert_eq!(dns, format!("[Resolve]\nDNS={}\n", site.host_ip));
    let ntp =
        std::fs::read_to_string(node.path("/etc/systemd/timesyncd.conf.d/50-tether.conf")).unwrap();
    assert_eq!(ntp, format!("[Time]\nNTP={}\n", site.host_ip));
    config_of_another_machine_is_forbidden(&node, qname).await;

    // A Deployment of the test image, one HTTP server per node.
    let web = deploy_web(site, &tenant);
    eprintln!("web pods {web:?} after {:?}", power_on.elapsed());
    for n in [nname, qname] {
        assert!(
            web.iter().any(|(on, _)| on == n),
            "no web pod on {n}: {web:?}"
        );
    }

    // From a pod on each node: the API's name resolves through CoreDNS, the API's Service
    // (kube-proxy's rules) connects, and the web pod on the *other* node answers.
    for (on, other) in [(nname, qname), (qname, nname)] {
        let target = &web.iter().find(|(n, _)| n == other).unwrap().1;
        let probe = format!("probe-{on}");
        let file = site.dir.join(format!("{probe}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {probe}, namespace: default}}\n\
                 spec:\n  nodeName: {on}\n  restartPolicy: Never\n  containers:\n\
                 \x20 - name: probe\n    image: {}\n    command: [sh, -c, \
                 'nslookup kubernetes.default.svc.cluster.local && \
                 printf \"GET /readyz HTTP/1.0\\r\\n\\r\\n\" | \
                 nc -w 5 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT | \
                 grep \"HTTPS server\" && \
                 timeout 15 wget -q -O - http://{target}:8080/ | grep \"web on {other}\"']\n",
                tether_image::containers::ContainerImage::TestShell.reference(&Pins::default())
            ),
        )
        .unwrap();
        tenant
            .kubectl(&["apply", "-f", &file.display().to_string()])
            .unwrap();
        let phase = tenant.wait_for(
            &format!("pod/{probe}"),
            "{.status.phase}",
            &["Succeeded", "Failed"],
            Duration::from_secs(180),
        );
        assert_eq!(
            phase.as_deref(),
            Ok("Succeeded"),
            "{}\nits log (nspawn node only):\n{}\nnspawn node routes:\n{}\nnspawn agent:\n{}",
            tenant
                .kubectl(&["describe", "pod", &probe])
                .unwrap_or_default(),
            nspawn::pod_log(&node, "default", &probe),
            netns.ip(&["route"]).unwrap_or_default(),
            node.journal("tether-agent", 30)
        );
        eprintln!(
            "{probe}: DNS, the API's Service and the web pod on {other} ({target}) answered, after {:?}",
            power_on.elapsed()
        );
    }
    // Scale 2 → 1: the least ready, then the highest name goes (both are Ready: the
    // nspawn machine): drained, its Node deleted, the node wiped, the Machine free again.
    site.kubectl(&["scale", "wp/workers", "--replicas=1"])
        .unwrap();
    let released = Instant::now();
    wait_machine(&client, nname, Duration::from_secs(180), |m| {
        m.spec.pool.is_none()
            && m.status
                .as_ref()
                .is_some_and(|s| s.phase == MachinePhase::Enrolled)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    eprintln!(
        "scale 2 → 1: {nname} drained, wiped and free after {:?}",
        released.elapsed()
    );
    assert!(
        tenant.kubectl(&["get", "node", nname]).is_err(),
        "the released machine's Node is deleted"
    );
    nothing_of_the_tenant_is_left(site, &node, nname);
    // Scale back: the same machine is claimed again and rejoins.
    site.kubectl(&["scale", "wp/workers", "--replicas=2"])
        .unwrap();
    let back = Instant::now();
    wait_machine(&client, nname, Duration::from_secs(240), |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.phase == MachinePhase::Ready)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", diag()));
    tenant
        .wait(
            &format!("node/{nname}"),
            READY,
            "True",
            Duration::from_secs(60),
        )
        .unwrap();
    eprintln!(
        "scale 1 → 2: {nname} Ready again after {:?}",
        back.elapsed()
    );

    // A diskless node power-cycled boots from tether-pxe again, enrolls as the same Machine
    // with a new boot token, gets a new bootstrap token and rejoins under the same name.
    drop(vm);
    let vm = site
        .vm_on_segment("join-qemu-again", &qmac, QEMU_MIB)
        .args(["-boot", "n"])
        .spawn()
        .expect("start qemu again");
    let again = Instant::now();
    // Until it enrolls again (75 s into a PXE boot on a loaded machine; 60 s was too short).
    wait_machine(&client, qname, Duration::from_secs(180), |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.phase != MachinePhase::Ready)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tether_testkit::qemu::tail(&vm.console(), 40)));
    wait_machine(&client, qname, Duration::from_secs(300), |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.phase == MachinePhase::Ready)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            tether_testkit::qemu::tail(&vm.console(), 40),
            site.operator_log()
        )
    });
    tenant
        .wait(
            &format!("node/{qname}"),
            READY,
            "True",
            Duration::from_secs(60),
        )
        .unwrap();
    eprintln!(
        "{qname} power-cycled: Ready again under its name after {:?}",
        again.elapsed()
    );

    // (The Service's address comes from the environment, as in-cluster clients take it:
    // busybox's other applets resolve through static glibc, which cannot load NSS modules
    // in a scratch image. busybox has no TLS client kube-apiserver accepts (wget's
    // handshake is refused, alert 40), so the probe speaks plain HTTP to the Service and
    // kube-apiserver's Go TLS server itself answers "Client sent an HTTP request to an
    // HTTPS server": the API process answered through kube-proxy's rules. That it serves
    // API requests through the Service is what CoreDNS's readiness above shows — it lists
    // Services through it. Bookworm's static busybox wget crashes on `-T`, hence
    // `timeout`.)
}

/// Deploys `web` (two replicas of the test image's httpd, one per node) and returns its
/// pods' (node, pod IP) once both are ready.
fn deploy_web(site: &Site, tenant: &Tenant) -> Vec<(String, String)> {
    let file = site.dir.join("web.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  replicas: 2\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n\
             \x20   metadata: {{labels: {{app: web}}}}\n    spec:\n\
             \x20     topologySpreadConstraints:\n\
             \x20     - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, \
             whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: web}}}}}}\n\
             \x20     containers:\n      - name: web\n        image: {}\n\
             \x20       env: [{{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}]\n\
             \x20       command: [sh, -c, 'mkdir -p /www && echo \"web on $NODE\" > /www/index.html \
             && exec httpd -f -p 8080 -h /www']\n\
             \x20       readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 2}}\n",
            tether_image::containers::ContainerImage::TestShell.reference(&Pins::default())
        ),
    )
    .unwrap();
    tenant
        .kubectl(&["apply", "-f", &file.display().to_string()])
        .unwrap();
    tenant
        .wait(
            "deployment/web",
            "{.status.readyReplicas}",
            "2",
            Duration::from_secs(240),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{}",
                tenant
                    .kubectl(&["get", "pods", "-o", "wide"])
                    .unwrap_or_default()
            )
        });
    let out = tenant
        .kubectl(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
        ])
        .unwrap();
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, ip)| (n.to_string(), ip.to_string()))
        .collect()
}

/// A kubelet whose bytes do not match the digest the desired config names is refused: the
/// Machine is `Failed` with `NodeInstalled=False` (`DigestMismatch`) and nothing is installed.
/// Deleting the tenant then deletes its pool first, which wipes and frees the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_kubelet_is_refused_and_deleting_the_tenant_frees_the_machine() {
    let site = tokio::task::spawn_blocking(site).await.unwrap();
    let store = node::fill_store(site).await;
    let tenant = tokio::task::spawn_blocking(move || Tenant::create(site, "tamper"))
        .await
        .unwrap();
    // "Kubelet v1.36.2": the pinned kubelet plus a byte, pushed; then one byte of the
    // store's copy flipped, as a corrupted store would serve it (bytes that do not match the digest).
    let pinned = tether_upstream::Cache::from_env()
        .pinned(tether_upstream::Component::Kubelet)
        .unwrap();
    let fake = site.dir.join("kubelet-v1.36.2");
    let mut bytes = std::fs::read(&pinned).unwrap();
    bytes.push(b'\n');
    std::fs::write(&fake, &bytes).unwrap();
    let (s, work) = (store.clone(), site.dir.join("containers"));
    let pushed = tokio::task::spawn_blocking(move || {
        tether_image::node_artifacts::push_binary(
            tether_upstream::Component::Kubelet,
            "v1.36.2",
            &fake,
            &s,
            &Pins::default(),
            &work,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let hex = pushed.blob.strip_prefix("sha256:").unwrap();
    let data = site
        .dir
        .join("standalone/registry/data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut stored = std::fs::read(&data).unwrap();
    let mid = stored.len() / 2;
    stored[mid] ^= 0xff;
    std::fs::write(&data, &stored).unwrap();

    let user_data = site.token(&["create", "--ttl", "15m", "--uses", "1", "--user-data"]);
    let seed = site.seed_dir("tamper-nspawn", &user_data);
    let mac = site.next_mac();
    let name = node::machine_of(&mac);
    let netns = site.node_netns(&mac);
    let node = nspawn::boot_kubernetes_node(site, &name, &netns, &seed).await;
    tokio::task::block_in_place(|| {
        node::apply_pool(site, "tamper", "tampered", 1, Some("v1.36.2"), &[&mac])
    });
    let client = site.client().await;
    let refused = wait_machine(&client, &name, Duration::from_secs(180), |m| {
        m.status.as_ref().is_some_and(|s| {
            s.phase == MachinePhase::Failed
                && s.conditions.iter().any(|c| {
                    c.type_ == "NodeInstalled"
                        && c.status == "False"
                        && c.reason == "DigestMismatch"
                })
        })
    })
    .await;
    refused.unwrap_or_else(|e| panic!("{e}\n{}", node.journal("tether-agent", 40)));
    let bin = node.path("/var/lib/tether/bin");
    let installed: Vec<String> = std::fs::read_dir(&bin)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        installed.is_empty(),
        "nothing installed, no partial kept: {installed:?}"
    );
    for p in [
        "/etc/containerd/config.toml",
        "/etc/systemd/system/kubelet.service",
    ] {
        assert!(
            !node.path(p).exists(),
            "{p} written although the kubelet was refused"
        );
    }
    eprintln!(
        "tampered kubelet refused: Failed, NodeInstalled=False DigestMismatch, nothing installed"
    );

    // The machine has no kubelet certificate, so the operator keeps a bootstrap token minted
    // for it: with that token, a client CSR for its own name is approved and one for another
    // node's name denied.
    let token = {
        let get = |key: &str| {
            let v = tenant
                .kubectl(&[
                    "-n",
                    "kube-system",
                    "get",
                    "secrets",
                    "-l",
                    &format!("tether.dev/machine={name}"),
                    "-o",
                    &format!("jsonpath={{.items[0].data.{key}}}"),
                ])
                .unwrap();
            use base64::Engine;
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .unwrap(),
            )
            .unwrap()
        };
        format!("{}.{}", get("token-id"), get("token-secret"))
    };
    let as_token = tenant_kubeconfig(site, &tenant, "as-token", &format!("{{token: {token}}}"));
    let signer = "kubernetes.io/kube-apiserver-client-kubelet";
    let own = csr_verdict(
        site,
        &tenant,
        &as_token,
        "own-client",
        signer,
        &name,
        None,
        "client auth",
    );
    assert_eq!(own, "Approved/TetherApproved");
    let other = csr_verdict(
        site,
        &tenant,
        &as_token,
        "other-client",
        signer,
        "mac-525400ffffff",
        None,
        "client auth",
    );
    assert_eq!(other, "Denied/WrongNodeName");
    eprintln!("with {name}'s bootstrap token: own client CSR {own}, another node's {other}");

    // Deleting the tenant deletes its pool first; the pool's machine is wiped and freed.
    site.kubectl(&["delete", "tcp/tamper", "--wait=false"])
        .unwrap();
    let deleted = Instant::now();
    wait_machine(&client, &name, Duration::from_secs(240), |m| {
        m.spec.pool.is_none()
            && m.status
                .as_ref()
                .is_some_and(|s| s.phase == MachinePhase::Enrolled && s.tenant.is_none())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            node.journal("tether-agent", 40),
            site.operator_log()
        )
    });
    assert!(
        !node.path("/var/lib/tether/tenant").exists(),
        "the tenant marker is gone"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while site.kubectl(&["get", "tcp/tamper"]).is_ok() {
        assert!(Instant::now() < deadline, "tcp/tamper still there");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        site.kubectl(&["get", "wp/tampered"]).is_err(),
        "the pool went with its tenant"
    );

    // Another tenant's pool claims the wiped machine, and it joins that tenant.
    let other = tokio::task::spawn_blocking(move || Tenant::create(site, "tamper-b"))
        .await
        .unwrap();
    tokio::task::block_in_place(|| node::apply_pool(site, "tamper-b", "second", 1, None, &[&mac]));
    let claimed = Instant::now();
    wait_machine(&client, &name, Duration::from_secs(240), |m| {
        m.spec.pool.as_deref() == Some("default/second")
            && m.status
                .as_ref()
                .is_some_and(|s| s.phase == MachinePhase::Ready)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.journal("tether-agent", 40)));
    other
        .wait(
            &format!("node/{name}"),
            READY,
            "True",
            Duration::from_secs(60),
        )
        .unwrap();
    let marker = std::fs::read_to_string(node.path("/var/lib/tether/tenant")).unwrap();
    assert_eq!(marker.trim(), "default/tamper-b");
    eprintln!(
        "the freed machine joined tenant tamper-b, Ready after {:?}",
        claimed.elapsed()
    );
    eprintln!(
        "tenant deleted with its pool, machine free after {:?}",
        deleted.elapsed()
    );
}

/// When each of [`node::CONSOLE_MARKS`] first appeared, from power-on.
fn console_marks(vm: &mut tether_testkit::qemu::Vm) -> Vec<(&'static str, Duration)> {
    node::CONSOLE_MARKS
        .iter()
        .map(|(what, marker)| {
            let at = vm
                .wait_for(marker, "", Duration::from_secs(480))
                .unwrap_or_else(|e| panic!("qemu node, waiting for {what}: {e}"));
            (*what, at)
        })
        .collect()
}

/// Prints the join figures as one `bench: {json}` line (what `cargo xtask bench join`
/// reads): the qemu node's phases from power-on, the nspawn node's from its boot, bytes the
/// qemu node fetched from the store, and the nspawn agent's memory.
fn report_bench(
    site: &Site,
    tenant: &Tenant,
    node: &tether_testkit::nspawn::Container,
    qname: &str,
    qphases: &[(MachinePhase, Duration)],
    nphases: &[(MachinePhase, Duration)],
    marks: &[(&str, Duration)],
) {
    let at = |ph: &[(MachinePhase, Duration)], p: MachinePhase| {
        ph.iter()
            .find(|(x, _)| *x == p)
            .map(|(_, d)| d.as_secs_f64())
    };
    let mut qemu: Vec<(String, f64)> = vec![(
        "PXE: DHCP, iPXE, script (Machine discovered)".into(),
        at(qphases, MachinePhase::Discovered).unwrap_or_default(),
    )];
    qemu.extend(marks.iter().map(|(w, d)| (w.to_string(), d.as_secs_f64())));
    qemu.push((
        "enrolled".into(),
        at(qphases, MachinePhase::Enrolled).unwrap_or_default(),
    ));
    qemu.push((
        "Node Ready".into(),
        at(qphases, MachinePhase::Ready).unwrap_or_default(),
    ));
    qemu.sort_by(|a, b| a.1.total_cmp(&b.1));
    let gets = node::store_gets(site, &tenant.node_ip(qname));
    let all: u64 = gets.iter().map(|g| g.bytes).sum();
    let binaries: u64 = gets
        .iter()
        .filter(|g| g.path.starts_with("/v2/tether/node/"))
        .map(|g| g.bytes)
        .sum();
    let pid = std::process::Command::new("nsenter")
        .args([
            "-t",
            &leader_of(node),
            "-a",
            "systemctl",
            "show",
            "-p",
            "MainPID",
            "--value",
            "tether-agent",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let proc_status =
        std::fs::read_to_string(node.path(format!("/proc/{pid}/status"))).unwrap_or_default();
    let kib = |key: &str| -> u64 {
        proc_status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let bench = serde_json::json!({
        "qemu_phases": qemu,
        // (Enrolled and claimed can fall between two polls: then the first phase seen.)
        "nspawn_enrolled_to_ready_s": at(nphases, MachinePhase::Ready)
            .zip(at(nphases, MachinePhase::Enrolled).or(nphases.first().map(|p| p.1.as_secs_f64())))
            .map(|(r, e)| r - e),
        "nspawn_boot_to_ready_s": at(nphases, MachinePhase::Ready),
        "qemu_bytes_binaries": binaries,
        "qemu_bytes_all": all,
        "agent_rss_kib": kib("VmRSS:"),
        "agent_peak_rss_kib": kib("VmHWM:"),
    });
    eprintln!("bench: {bench}");
}

/// The nspawn container's leader PID (its init, as the host sees it).
fn leader_of(node: &tether_testkit::nspawn::Container) -> String {
    node.path("/")
        .to_string_lossy()
        .split('/')
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

/// The phases Machine `name` goes through, each with its time from `since`, until Ready.
async fn phases(
    client: kube::Client,
    name: String,
    since: Instant,
) -> Vec<(MachinePhase, Duration)> {
    let api: Api<Machine> = Api::all(client);
    let mut seen: Vec<(MachinePhase, Duration)> = Vec::new();
    loop {
        if let Ok(Some(m)) = api.get_opt(&name).await
            && let Some(p) = m.status.map(|s| s.phase)
            && seen.last().map(|l| l.0) != Some(p)
        {
            seen.push((p, since.elapsed()));
            if p == MachinePhase::Ready {
                return seen;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Each node's client and serving certificates were approved by the operator (the
/// controller-manager approves no first client certificate), and the bootstrap tokens are
/// gone once the kubelets hold their certificates.
fn certificates_are_per_machine(tenant: &Tenant, nodes: &[&str]) {
    let csrs = tenant
        .kubectl(&[
            "get",
            "csr",
            "-o",
            r#"jsonpath={range .items[*]}{.spec.signerName} {.spec.username} {.status.conditions[0].type} {.status.conditions[0].reason}{"\n"}{end}"#,
        ])
        .unwrap();
    for n in nodes {
        let serving =
            format!("kubernetes.io/kubelet-serving system:node:{n} Approved TetherApproved");
        assert!(
            csrs.contains(&serving),
            "{n}'s serving CSR approved by Tether:\n{csrs}"
        );
    }
    let client: Vec<&str> = csrs
        .lines()
        .filter(|l| l.starts_with("kubernetes.io/kube-apiserver-client-kubelet system:bootstrap:"))
        .collect();
    assert!(
        client.len() >= nodes.len()
            && client
                .iter()
                .all(|l| l.ends_with("Approved TetherApproved")),
        "every first client CSR approved by Tether:\n{csrs}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = tenant
            .kubectl(&[
                "-n",
                "kube-system",
                "get",
                "secrets",
                "-l",
                "tether.dev/machine",
                // The machines' tunnel anchors carry the label too, and stay.
                "--field-selector",
                "type=bootstrap.kubernetes.io/token",
                "-o",
                "name",
            ])
            .unwrap();
        if left.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bootstrap tokens left after the join: {left}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The qemu node fetched each runtime binary from the store once, by digest, and did not
/// pull pause (the image bakes it in).
fn downloads_came_from_the_store_once(site: &Site, tenant: &Tenant, qname: &str) {
    let gets = node::store_gets(site, &tenant.node_ip(qname));
    let mut per_blob: BTreeMap<&str, usize> = BTreeMap::new();
    for g in gets
        .iter()
        .filter(|g| g.path.starts_with("/v2/tether/node/") && g.path.contains("/blobs/"))
    {
        *per_blob.entry(g.path.as_str()).or_default() += 1;
    }
    assert_eq!(
        per_blob.len(),
        tether_upstream::NODE_COMPONENTS.len(),
        "every node binary fetched from the store: {per_blob:?}"
    );
    assert!(
        per_blob.values().all(|n| *n == 1),
        "nothing fetched twice: {per_blob:?}"
    );
    assert!(
        !gets.iter().any(|g| g.path.contains("/v2/pause/manifests/")),
        "the qemu node pulled pause although the image has it"
    );
    assert!(
        gets.iter()
            .any(|g| g.path.contains("/v2/kube-proxy/manifests/")),
        "the qemu node pulled kube-proxy from the store"
    );
}

/// A released node holds nothing of its tenant: no kubelet or containerd state, no
/// configuration, certificates, CNI network, runtime binaries or marker, and containerd's
/// state directory is empty.
fn nothing_of_the_tenant_is_left(
    site: &Site,
    node: &tether_testkit::nspawn::Container,
    name: &str,
) {
    for p in [
        "/var/lib/kubelet",
        "/etc/kubernetes",
        "/etc/containerd",
        "/etc/cni/net.d/10-tether.conflist",
        "/var/lib/cni",
        "/var/lib/tether/bin",
        "/var/lib/tether/cni",
        "/var/lib/tether/tenant",
        "/etc/systemd/system/kubelet.service",
        "/etc/systemd/system/containerd.service",
    ] {
        assert!(!node.path(p).exists(), "{p} is left on the released node");
    }
    let state = site.dir.join("nodes").join(name).join("containerd");
    let left: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "containerd state left: {left:?}");
}

/// The nspawn node's machine identity reaches its own config only: asking for the qemu
/// Machine's (whose join carries that machine's tenant credentials) is refused, through
/// the agent's own client.
async fn config_of_another_machine_is_forbidden(
    node: &tether_testkit::nspawn::Container,
    other: &str,
) {
    use tether_agent::api::MachineApi;
    use tether_api::machine_api::Reason;
    let id = tether_agent::identity::StateDir::new(node.path("/var/lib/tether"))
        .load()
        .unwrap()
        .expect("the node is enrolled");
    let api = MachineApi::mutual(&id.enrolled.api, &id).unwrap();
    let own = api.config(&id.enrolled.machine, None, Duration::ZERO).await;
    assert!(
        own.is_ok_and(|c| c.join.is_some()),
        "its own config, with its join"
    );
    match api.config(other, None, Duration::ZERO).await {
        Err(tether_agent::Error::Refused { error, .. }) => {
            assert_eq!(error.reason, Reason::Forbidden, "{error}");
            assert_eq!(error.reason.http_status(), 403);
            eprintln!(
                "{}'s certificate asking for {other}'s config: {error}",
                id.enrolled.machine
            );
        }
        other_answer => panic!("another Machine's config: {other_answer:?}"),
    }
}

/// A kubeconfig for the tenant as `user` (a YAML user entry), written to `<name>.kubeconfig`.
fn tenant_kubeconfig(site: &Site, tenant: &Tenant, name: &str, user: &str) -> std::path::PathBuf {
    let get = |path: &str| {
        tenant
            .kubectl(&[
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                &format!("jsonpath={path}"),
            ])
            .unwrap()
    };
    let endpoint = get("{.clusters[0].cluster.server}");
    let ca = get("{.clusters[0].cluster.certificate-authority-data}");
    let file = site.dir.join(format!("{name}.kubeconfig"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: t, cluster: {{server: '{endpoint}', certificate-authority-data: {ca}}}}}]\n\
             users: [{{name: u, user: {user}}}]\n\
             contexts: [{{name: c, context: {{cluster: t, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    file
}

/// Creates CSR `test-<name>` as the holder of `kubeconfig` — signer `signer`, CN
/// `system:node:<node>`, O `system:nodes`, `ip` as its one SAN if given, usages digital
/// signature + `usage` — and returns its first condition as `<type>/<reason>` once decided.
#[allow(clippy::too_many_arguments)]
fn csr_verdict(
    site: &Site,
    tenant: &Tenant,
    kubeconfig: &std::path::Path,
    name: &str,
    signer: &str,
    node: &str,
    ip: Option<&str>,
    usage: &str,
) -> String {
    use base64::Engine;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    if let Some(ip) = ip {
        params.subject_alt_names = vec![rcgen::SanType::IpAddress(ip.parse().unwrap())];
    }
    let request = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\n\
         metadata: {{name: test-{name}}}\n\
         spec:\n  signerName: {signer}\n  usages: [digital signature, {usage}]\n  request: {}\n",
        base64::engine::general_purpose::STANDARD.encode(request)
    );
    let f = site.dir.join(format!("test-{name}.csr.yaml"));
    std::fs::write(&f, csr).unwrap();
    tether_vm_tests::site::kubectl(kubeconfig, &["create", "-f", &f.display().to_string()])
        .unwrap_or_else(|e| panic!("create CSR {name}: {e}"));
    let decided = tenant.wait_for(
        &format!("csr/test-{name}"),
        "{.status.conditions[0].type}",
        &["Approved", "Denied"],
        Duration::from_secs(60),
    );
    assert!(decided.is_ok(), "CSR {name} undecided: {decided:?}");
    tenant
        .kubectl(&[
            "get",
            &format!("csr/test-{name}"),
            "-o",
            "jsonpath={.status.conditions[0].type}/{.status.conditions[0].reason}",
        ])
        .unwrap()
}

/// A serving CSR of this node naming an address that is not its Machine's is denied.
fn a_foreign_serving_address_is_denied(
    site: &Site,
    tenant: &Tenant,
    node: &tether_testkit::nspawn::Container,
    own: &str,
) {
    // (An absolute symlink inside the node: resolved against the node's root.)
    let current = node.path("/var/lib/kubelet/pki/kubelet-client-current.pem");
    let pem = match std::fs::read_link(&current) {
        Ok(target) if target.is_absolute() => node.path(target),
        _ => current,
    };
    let kubelet_pem = site.dir.join("own-kubelet.pem");
    std::fs::copy(&pem, &kubelet_pem).unwrap();
    let p = kubelet_pem.display();
    let as_node = tenant_kubeconfig(
        site,
        tenant,
        "as-node",
        &format!("{{client-certificate: {p}, client-key: {p}}}"),
    );
    let got = csr_verdict(
        site,
        tenant,
        &as_node,
        "foreign-address",
        "kubernetes.io/kubelet-serving",
        own,
        Some("10.99.99.99"),
        "server auth",
    );
    assert_eq!(got, "Denied/AddressNotOfMachine");
    eprintln!("serving CSR naming 10.99.99.99 for {own}: {got}");
}
