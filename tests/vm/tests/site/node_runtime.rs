//! Issue 9's first step, as a test: a node of the built image joined to a tenant by hand —
//! no agent — with the pinned containerd 2.x, runc, CNI plugins and kubelet, and every
//! image pulled through containerd's `registry.k8s.io` mirror from standalone's artifact
//! store, which `tether-image containers` filled. Nothing is pre-imported.

use std::time::{Duration, Instant};

use tether_upstream::Pins;
use tether_vm_tests::node::{self, Tenant};
use tether_vm_tests::site::site;

const READY: &str = r#"{.status.conditions[?(@.type=="Ready")].status}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nspawn_node_joined_by_hand_runs_kube_proxy_coredns_and_pods_from_the_store() {
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
    eprintln!(
        "tenant Ready and {} images pushed after {:?}",
        pushed.len(),
        started.elapsed()
    );

    let name = "hand-nspawn";
    let netns = site.node_netns(&site.next_mac());
    let node = node::boot_nspawn_node(site, name, &netns).await;
    let power_on = Instant::now();
    node::join(&node, &tenant, &store, name, true).await;
    let cidr = node::write_cni(&node, &tenant, name, Duration::from_secs(120));
    let registered = power_on.elapsed();
    tenant
        .wait(
            &format!("node/{name}"),
            READY,
            "True",
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", node.journal("kubelet", 40)));
    eprintln!(
        "node {name}: registered with podCIDR {cidr} after {registered:?}, Ready after {:?}",
        power_on.elapsed()
    );

    // kube-proxy (DaemonSet) and CoreDNS (Deployment) come up on it, from the store.
    let on_node = format!("spec.nodeName={name}");
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let proxy = tenant.kubectl(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "k8s-app=kube-proxy",
            "--field-selector",
            &on_node,
            "-o",
            "jsonpath={.items[*].status.phase}",
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
        if proxy.as_deref() == Ok("Running") && dns.as_deref() == Ok("2") {
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
        "kube-proxy and CoreDNS running after {:?}",
        power_on.elapsed()
    );
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

    // A pod of the test image resolves the API's name through CoreDNS and connects to the
    // API through the kubernetes Service (kube-proxy's rules), then exits 0.
    let pod = site.dir.join("probe.yaml");
    std::fs::write(
        &pod,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: probe, namespace: default}}\n\
             spec:\n  nodeName: {name}\n  restartPolicy: Never\n  containers:\n\
             \x20 - name: probe\n    image: {}\n    command: [sh, -c, \
             'nslookup kubernetes.default.svc.cluster.local && \
             nc -w 5 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT </dev/null']\n",
            tether_image::containers::ContainerImage::TestShell.reference(&Pins::default())
        ),
    )
    .unwrap();
    tenant
        .kubectl(&["apply", "-f", &pod.display().to_string()])
        .unwrap();
    // (The Service's address comes from the environment, as in-cluster clients take it:
    // busybox's other applets resolve through static glibc, which cannot load NSS modules
    // in a scratch image. That the API *answers* through the Service is what CoreDNS's
    // readiness above shows — it lists Services through it. busybox wget's TLS handshake
    // with kube-apiserver is refused (alert 40), so the probe stops at the connection.)
    let phase = tenant.wait_for(
        "pod/probe",
        "{.status.phase}",
        &["Succeeded", "Failed"],
        Duration::from_secs(120),
    );
    assert_eq!(
        phase.as_deref(),
        Ok("Succeeded"),
        "{}\nits log:\n{}",
        tenant
            .kubectl(&["describe", "pod", "probe"])
            .unwrap_or_default(),
        node::pod_log(&node, "default", "probe")
    );
    eprintln!("probe pod Succeeded after {:?}", power_on.elapsed());
}
