//! Proves the cluster harness against the real upstream binaries: a CRD round trip through
//! etcd + kube-apiserver, and a hand-started control plane whose controller-manager and
//! scheduler demonstrably do their jobs.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use tether_api::{Machine, MachinePhase, MachineSpec, MachineStatus};
use tether_testkit::{ClusterOptions, TestCluster};

/// Polls `f` every 200 ms until it returns `Some`, for at most `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_round_trip_on_real_apiserver() {
    let cluster = TestCluster::start()
        .await
        .expect("start etcd + kube-apiserver");
    let client = cluster.client();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Machine::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("tether-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("server-side apply of the Machine CRD");
    eventually("Machine CRD Established", Duration::from_secs(30), || {
        let crds = crds.clone();
        async move {
            let c = crds.get("machines.tether.dev").await.ok()?;
            let established = c
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;

    let machines: Api<Machine> = Api::all(client.clone());
    let spec = MachineSpec {
        macs: vec!["52:54:00:00:00:01".into()],
        uuid: Some("4c4c4544-0000-1000-8000-000000000001".into()),
        ..Default::default()
    };
    let created = machines
        .create(&PostParams::default(), &Machine::new("m1", spec.clone()))
        .await
        .expect("create Machine");
    assert!(created.metadata.uid.is_some(), "apiserver assigned a uid");

    let read = machines.get("m1").await.expect("read Machine back");
    assert_eq!(read.spec, spec);
    assert_eq!(read.status, None);

    // The status subresource is separate from spec, as the operator will rely on.
    let status = serde_json::json!({"status": MachineStatus {
        phase: MachinePhase::Enrolled,
        ..Default::default()
    }});
    machines
        .patch_status("m1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch status");
    let read = machines.get("m1").await.expect("read Machine again");
    assert_eq!(read.status.map(|s| s.phase), Some(MachinePhase::Enrolled));

    // The schema generated from the Rust types is enforced by the real apiserver.
    let bad = serde_json::json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "Machine",
        "metadata": {"name": "bad"},
        "spec": {"macs": "not-a-list"}
    });
    let dynamic: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<Machine>(&()),
    );
    let rejected = dynamic
        .create(
            &PostParams::default(),
            &serde_json::from_value(bad).expect("valid DynamicObject JSON"),
        )
        .await
        .expect_err("a Machine whose macs is a string must be rejected");
    assert!(
        rejected.to_string().contains("spec.macs"),
        "error names the bad field: {rejected}"
    );
    assert!(
        machines.get_opt("bad").await.unwrap().is_none(),
        "nothing was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_started_control_plane_works() {
    let mut cluster = TestCluster::start_with(ClusterOptions::full())
        .await
        .expect("start etcd, kube-apiserver, kube-controller-manager, kube-scheduler");

    let readyz = cluster.readyz_verbose().await.expect("GET /readyz?verbose");
    assert!(readyz.contains("readyz check passed"), "{readyz}");
    assert!(readyz.contains("[+]etcd ok"), "{readyz}");

    let ns = cluster
        .kubectl(&["get", "ns", "-o", "name"])
        .expect("kubectl get ns");
    for want in [
        "namespace/default",
        "namespace/kube-system",
        "namespace/kube-public",
    ] {
        assert!(ns.lines().any(|l| l == want), "missing {want} in:\n{ns}");
    }

    // kube-controller-manager: its serviceaccount controller fills every new namespace.
    cluster
        .kubectl(&["create", "namespace", "probe"])
        .expect("kubectl create namespace");
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client(), "probe");
    eventually(
        "default ServiceAccount in namespace probe",
        Duration::from_secs(60),
        || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten() }
        },
    )
    .await;

    // kube-scheduler: a pod that tolerates everything is bound to the only node.
    let nodes: Api<Node> = Api::all(cluster.client());
    // Nodes may carry status on create (kubelets do): give it room for pods.
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1"},
        "status": {
            "capacity": {"cpu": "2", "memory": "2Gi", "pods": "10"},
            "allocatable": {"cpu": "2", "memory": "2Gi", "pods": "10"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))
    .unwrap();
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create Node");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p1"},
        "spec": {
            "containers": [{"name": "c", "image": "example.invalid/none"}],
            "tolerations": [{"operator": "Exists"}]
        }
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "probe");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create Pod");
    let node = eventually("pod p1 scheduled", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { pods.get("p1").await.ok()?.spec?.node_name }
    })
    .await;
    assert_eq!(node, "n1");

    cluster
        .check_running()
        .expect("every component still running");
}
