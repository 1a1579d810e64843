//! Issue 9's first step, as a test: two machines of the built image joined to a tenant by
//! hand — no agent — with the pinned containerd 2.x, runc, CNI plugins and kubelet: an nspawn
//! node (files written, units started over D-Bus) and a qemu node under TCG (its own kernel,
//! cgroup v2; a shell script run by systemd's `systemd.run=`). Every image is pulled through
//! containerd's `registry.k8s.io` mirror from standalone's artifact store, which `tether-image
//! containers` filled; nothing is pre-imported but the pause image the node image carries
//! (the qemu node imports it; the nspawn node pulls it). The qemu node downloads its runtime
//! from the store with the image's `tether-agent fetch`. Pods reach each other across the
//! nodes over host-gw routes.

use std::time::{Duration, Instant};

use tether_testkit::qemu::Vm;
use tether_upstream::Pins;
use tether_vm_tests::node::{self, Tenant, nspawn, qemu};
use tether_vm_tests::site::site;

const READY: &str = r#"{.status.conditions[?(@.type=="Ready")].status}"#;

/// What the qemu node's console shows, in order, as it joins (`join.sh`).
const QEMU_PHASES: &[(&str, &str)] = &[
    ("rootfs verified", "tether-initramfs: rootfs verified"),
    (
        "runtime downloaded from the store, checked",
        "handjoin: runtime downloaded from the store",
    ),
    ("containerd running", "handjoin: containerd started"),
    ("kubelet running", "handjoin: kubelet started"),
    ("podCIDR assigned, CNI written", "handjoin: pod network"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_joined_by_hand_run_the_store_images_and_reach_each_other() {
    let site = site();
    let started = Instant::now();
    let tenant = tokio::task::spawn_blocking(move || Tenant::create(site, "hand"))
        .await
        .unwrap();
    let store = tether_testkit::published::artifact_store(&site.kubeconfig).unwrap();
    assert!(
        store.starts_with(&format!("{}:", site.host_ip)),
        "the store listens where nodes reach it: {store}"
    );
    let work = site.dir.join("containers");
    let pushed = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            tether_image::containers::push_all(&store, &Pins::default(), &work)
        })
        .await
        .unwrap()
        .expect("build and push the container images")
    };
    let artifacts = {
        let (store, work) = (store.clone(), site.dir.join("containers"));
        tokio::task::spawn_blocking(move || {
            tether_image::node_artifacts::push_all(&store, &Pins::default(), &work)
        })
        .await
        .unwrap()
        .expect("push the node artifacts")
    };
    eprintln!(
        "tenant Ready, {} images and {} node artifacts pushed after {:?}",
        pushed.len(),
        artifacts.len(),
        started.elapsed()
    );

    // The qemu node first: it is the slow one, and joins by itself once booted.
    let qname = "hand-qemu";
    let disks = qemu::prepare(site, &tenant, &store, &artifacts, qname);
    let mut vm = qemu::boot(site, qname, &site.next_mac(), &disks);

    let nname = "hand-nspawn";
    let netns = site.node_netns(&site.next_mac());
    let node = nspawn::boot_nspawn_node(site, nname, &netns).await;
    let power_on = Instant::now();
    nspawn::join(&node, &tenant, &store, nname).await;
    let ncidr = nspawn::write_cni(&node, &tenant, nname, Duration::from_secs(120));
    let registered = power_on.elapsed();
    tenant
        .wait(
            &format!("node/{nname}"),
            READY,
            "True",
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", node.journal("kubelet", 40)));
    eprintln!(
        "node {nname}: registered with podCIDR {ncidr} after {registered:?}, Ready after {:?}",
        power_on.elapsed()
    );

    let phases = tokio::task::block_in_place(|| qemu_node_ready(&mut vm, &tenant, qname));
    eprintln!("node {qname} (qemu, TCG), from power-on:");
    for (phase, at) in &phases {
        eprintln!("  {at:>9.1?}  {phase}");
    }

    // host-gw on the nspawn node (the qemu node's script keeps its own routes).
    let networks = node::pod_networks(&tenant);
    assert_eq!(
        networks.len(),
        2,
        "two Nodes with pod networks: {networks:?}"
    );
    for (cidr, via) in networks.iter().filter(|(c, _)| *c != ncidr) {
        netns.ip(&["route", "replace", cidr, "via", via]).unwrap();
    }

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
    // The kubelets' own pull times (docs/benchmarks.md quotes them).
    let pulls = tenant
        .kubectl(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            "reason=Pulled",
            "-o",
            "jsonpath={range .items[*]}{.source.host}: {.message}{\"\\n\"}{end}",
        ])
        .unwrap_or_default();
    for line in pulls.lines().filter(|l| l.contains("Successfully pulled")) {
        eprintln!("  pull {line}");
    }
    let log = std::fs::read_to_string(
        site.dir
            .join("standalone/management/tenants/registry/logs/registry.log"),
    )
    .unwrap();
    for manifest in [
        "/v2/pause/manifests/",
        "/v2/kube-proxy/manifests/",
        "/v2/coredns/coredns/manifests/",
    ] {
        assert!(
            log.contains(manifest),
            "the store's log shows no {manifest}"
        );
    }
    // The qemu node pulled kube-proxy from the store but not pause: the image bakes it in.
    let qemu_ip = tenant
        .kubectl(&[
            "get",
            "node",
            qname,
            "-o",
            r#"jsonpath={.status.addresses[?(@.type=="InternalIP")].address}"#,
        ])
        .unwrap();
    let from_qemu = |path: &str| {
        log.lines()
            .any(|l| l.contains(path) && l.contains(&format!("{}:", qemu_ip.trim())))
    };
    assert!(
        from_qemu("/v2/kube-proxy/manifests/"),
        "the store's log shows no kube-proxy pull from the qemu node ({qemu_ip})"
    );
    assert!(
        !from_qemu("/v2/pause/manifests/"),
        "the qemu node pulled pause although the image has it"
    );
    // The qemu node fetched its runtime from the store by digest.
    for a in &artifacts {
        assert!(
            from_qemu(&a.blob_path()),
            "the store's log shows no GET of {} from the qemu node",
            a.blob_path()
        );
    }

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
            "{}\nits log (nspawn node only):\n{}",
            tenant
                .kubectl(&["describe", "pod", &probe])
                .unwrap_or_default(),
            nspawn::pod_log(&node, "default", &probe)
        );
        eprintln!(
            "{probe}: DNS, the API's Service and the web pod on {other} ({target}) answered, after {:?}",
            power_on.elapsed()
        );
    }
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

/// Waits through the qemu node's join phases and its Node's Ready; returns each phase with
/// its time from power-on.
fn qemu_node_ready(vm: &mut Vm, tenant: &Tenant, name: &str) -> Vec<(&'static str, Duration)> {
    let mut phases = Vec::new();
    for (phase, marker) in QEMU_PHASES {
        let at = vm
            .wait_for(marker, "handjoin: FAILED", Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("qemu node, waiting for {phase}: {e}"));
        phases.push((*phase, at));
    }
    tenant
        .wait(
            &format!("node/{name}"),
            READY,
            "True",
            Duration::from_secs(240),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", tether_testkit::qemu::tail(&vm.console(), 40)));
    phases.push(("Node Ready", vm.elapsed()));
    phases
}

/// Deploys `web` (two replicas of the test image's httpd, one per node) and returns its
/// pods' (node, pod IP) once both are ready.
fn deploy_web(site: &tether_vm_tests::site::Site, tenant: &Tenant) -> Vec<(String, String)> {
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
