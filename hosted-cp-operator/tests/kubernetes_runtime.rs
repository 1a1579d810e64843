//! Acceptance: the `kubernetes` runtime's Deployment, Service and Secrets are accepted by a
//! real kube-apiserver (server-side apply) and the containers carry exactly the arguments
//! the process runtime runs.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tether_api::TenantControlPlaneSpec;
use tether_api::tenant_control_plane::KubernetesSpec;
use tether_operator::controlplane::pki::{self, PkiInputs};
use tether_operator::controlplane::render::{self, Ports, RenderInputs, Secrets, Storage};
use tether_operator::controlplane::runtime::kubernetes::manifests;
use tether_operator::kube::Files;
use tether_testkit::TestCluster;

async fn apply(client: &kube::Client, obj: &Value) -> Value {
    let (api, name) = tether_operator::kube::dynamic_api(client, obj).unwrap();
    let out = api
        .patch(
            &name,
            &PatchParams::apply("tether-test").force(),
            &Patch::Apply(obj),
        )
        .await
        .unwrap_or_else(|e| panic!("{} {name} refused: {e}", obj["kind"]));
    serde_json::to_value(out).unwrap()
}

fn secret(name: &str, ns: &str, files: &Files) -> Value {
    use base64::Engine;
    let data: BTreeMap<&String, String> = files
        .iter()
        .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v)))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "data": data})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_service_and_secrets_are_accepted_with_process_args() {
    let cluster = TestCluster::start().await.unwrap();
    let client = cluster.client();
    let ns = "tenants";
    apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;

    let mut spec = TenantControlPlaneSpec {
        kubernetes: KubernetesSpec {
            version: "v1.36.3".into(),
        },
        ..Default::default()
    };
    spec.control_plane.replicas = 2;
    spec.control_plane.service.type_ = tether_api::tenant_control_plane::ServiceType::NodePort;
    spec.control_plane.service.node_port = Some(31443);
    let names = Secrets::for_tenant("t1");
    for storage in [
        Storage::Etcd {
            servers: vec!["https://etcd.datastores.svc:2379".into()],
            prefix: "/tether/tenants/t1".into(),
        },
        Storage::Kine {
            dsn_secret: names.datastore.clone(),
        },
    ] {
        let inputs = RenderInputs {
            spec: &spec,
            version: "v1.36.3",
            storage: storage.clone(),
            ports: Ports::in_pod(&spec),
            bind_address: "0.0.0.0".into(),
            advertise_address: "127.0.0.1".into(),
            secrets: names.clone(),
            replicas: spec.control_plane.replicas as u32,
        };
        let components = render::render(&inputs);

        // The Secrets the controller applies for every runtime.
        let now = time::OffsetDateTime::now_utc();
        let (pki_files, _) = pki::ensure(
            &PkiInputs {
                tenant: "tenants/t1".into(),
                dns_names: vec!["t1.tenants.svc".into()],
                ips: vec!["10.96.0.1".parse().unwrap()],
            },
            &Files::new(),
            now,
        )
        .unwrap();
        let (kcs, _) = tether_operator::controlplane::kubeconfig::ensure(
            "t1",
            &pki_files,
            "https://127.0.0.1:6443",
            "https://t1.tenants.svc:6443",
            &Files::new(),
            now,
        )
        .unwrap();
        let ds = Files::from([
            ("ca.crt".to_string(), pki_files["ca.crt"].clone()),
            (
                "client.crt".to_string(),
                pki_files["apiserver-kubelet-client.crt"].clone(),
            ),
            (
                "client.key".to_string(),
                pki_files["apiserver-kubelet-client.key"].clone(),
            ),
            ("dsn".to_string(), b"postgres://u:p@db:5432/d".to_vec()),
        ]);
        let config = Files::from([(
            render::EGRESS_SELECTOR_KEY.to_string(),
            render::EGRESS_SELECTOR.as_bytes().to_vec(),
        )]);
        for (name, files) in [
            (&names.pki, &pki_files),
            (&names.kubeconfigs, &kcs),
            (&names.datastore, &ds),
            (&names.config, &config),
        ] {
            apply(&client, &secret(name, ns, files)).await;
        }

        let (deployment, service) = manifests("t1", ns, &spec, &components, &BTreeMap::new());
        let d = apply(&client, &deployment).await;
        let s = apply(&client, &service).await;
        assert_eq!(s["spec"]["ports"][0]["nodePort"], 31443);
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);

        // The stored Deployment runs the same args the process runtime would run with the
        // same ports (the process runtime only substitutes its allocated port numbers).
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), components.len());
        for c in &components {
            let stored = containers
                .iter()
                .find(|x| x["name"] == c.program.name())
                .unwrap();
            assert_eq!(stored["args"], json!(c.args), "{}", c.program.name());
            // Every file the args name is mounted from the Secret key that holds it.
            for f in &c.files {
                let (dir, file) = f.path.split_once('/').unwrap();
                let mount = stored["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["name"] == dir)
                    .unwrap();
                assert_eq!(mount["mountPath"], format!("/etc/tether/{dir}"));
                let vol = d["spec"]["template"]["spec"]["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == dir)
                    .unwrap();
                assert_eq!(vol["secret"]["secretName"], f.secret.as_str());
                assert!(
                    vol["secret"]["items"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|i| i["key"] == f.key.as_str() && i["path"] == file)
                );
            }
        }
        if matches!(storage, Storage::Kine { .. }) {
            let kine = containers.iter().find(|x| x["name"] == "kine").unwrap();
            assert_eq!(kine["env"][0]["valueFrom"]["secretKeyRef"]["key"], "dsn");
            assert!(
                !kine["args"].to_string().contains("postgres://"),
                "DSN must not be an argument"
            );
        }
        // A server-side dry run of the rendered objects is accepted too (admission included).
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        api.patch(
            "t1",
            &PatchParams::apply("tether-test").force().dry_run(),
            &Patch::Apply(&deployment),
        )
        .await
        .unwrap();
    }
}

/// The controller on the kubernetes runtime: the tenant's Deployment and Service appear in
/// the management cluster (standalone's, which has no nodes, so pods never run and the
/// tenant stays NotReady), carry the rendered arguments, and go away with the tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_on_kubernetes_runtime_applies_and_removes_deployments() {
    let op = common::Standalone::start_with(&["--runtime", "kubernetes"]).await;
    op.create("apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: kt, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n  controlPlane: {replicas: 2}\n").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let args = loop {
        if let Ok(a) = op.kubectl(&[
            "get",
            "deployment",
            "kt",
            "-o",
            "jsonpath={.spec.template.spec.containers[?(@.name==\"kube-apiserver\")].args}",
        ]) && !a.trim().is_empty()
        {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no Deployment:\n{}",
            common::tail(&op.dir.join("operator.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    for want in [
        "--etcd-prefix=/tether/default/kt",
        "--secure-port=6443",
        "--bind-address=0.0.0.0",
        "--client-ca-file=pki/client-ca.crt",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }
    let cm = op
        .kubectl(&["get", "deployment", "kt", "-o", "jsonpath={.spec.template.spec.containers[?(@.name==\"kube-controller-manager\")].args}"])
        .unwrap();
    assert!(
        cm.contains("--leader-elect=true"),
        "two replicas elect a leader: {cm}"
    );
    assert_eq!(
        op.kubectl(&["get", "deployment", "kt", "-o", "jsonpath={.spec.replicas}"])
            .unwrap(),
        "2"
    );
    assert_eq!(
        op.kubectl(&[
            "get",
            "service",
            "kt",
            "-o",
            "jsonpath={.spec.ports[0].port}"
        ])
        .unwrap(),
        "6443"
    );
    for s in [
        "kt-pki",
        "kt-kubeconfigs",
        "kt-datastore",
        "kt-config",
        "kt-admin-kubeconfig",
    ] {
        op.kubectl(&["get", "secret", s]).unwrap();
    }
    // No process was started on this machine for the tenant.
    assert!(!op.dir.join("tenants/default.kt/run").exists());
    // Without pods the tenant is not Ready, and says why.
    op.wait_for("default", "kt", Duration::from_secs(60), "NotReady", |t| {
        t.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "ControlPlaneAvailable" && c.status == "False")
        })
    })
    .await;

    kube::api::Api::<tether_api::TenantControlPlane>::namespaced(op.client.clone(), "default")
        .delete("kt", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.kubectl(&["get", "tcp", "kt"]).is_ok() {
        assert!(
            Instant::now() < deadline,
            "not deleted:\n{}",
            common::tail(&op.dir.join("operator.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(op.kubectl(&["get", "deployment", "kt"]).is_err());
    assert!(op.kubectl(&["get", "service", "kt"]).is_err());
    let secrets = op
        .kubectl(&["get", "secrets", "-l", "tether.dev/tenant=kt", "-o", "name"])
        .unwrap();
    assert!(secrets.trim().is_empty(), "{secrets}");

    // --- A tenant named like an object it does not own neither takes it over nor, when
    // deleted, removes it: `kubernetes` in `default` is the management API's own Service.
    let before = op
        .kubectl(&[
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.metadata.uid} {.spec.ports[0].port} {.metadata.ownerReferences}",
        ])
        .unwrap();
    op.create("apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: kubernetes, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n").await;
    op.wait_for(
        "default",
        "kubernetes",
        Duration::from_secs(60),
        "NameConflict",
        |t| {
            t.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.reason == "NameConflict" && c.message.contains("Service default/kubernetes")
                })
            })
        },
    )
    .await;
    assert!(op.kubectl(&["get", "deployment", "kubernetes"]).is_err());
    let service = |op: &common::Standalone| {
        op.kubectl(&[
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.metadata.uid} {.spec.ports[0].port} {.metadata.ownerReferences}",
        ])
        .unwrap()
    };
    assert_eq!(
        service(&op),
        before,
        "the management API's Service was changed"
    );
    kube::api::Api::<tether_api::TenantControlPlane>::namespaced(op.client.clone(), "default")
        .delete("kubernetes", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.kubectl(&["get", "tcp", "kubernetes"]).is_ok() {
        assert!(
            Instant::now() < deadline,
            "not deleted:\n{}",
            common::tail(&op.dir.join("operator.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        service(&op),
        before,
        "deleting the tenant removed a Service it does not own"
    );
}

/// `tether-operator run` against an existing cluster (a TestCluster's kube-apiserver):
/// installs the CRDs, watches tenants and reports a tenant without a DataStore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_command_serves_an_existing_cluster() {
    let cluster = TestCluster::start().await.unwrap();
    let dir = tether_testkit::test_dir("tether-run-").unwrap();
    let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tether-operator"))
        .args([
            "run",
            "--install-crds",
            "--runtime",
            "kubernetes",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("RUST_LOG", "info,kube_client=off")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let api = Api::<tether_api::TenantControlPlane>::namespaced(cluster.client(), "default");
    let tcp: tether_api::TenantControlPlane = serde_yaml::from_str(
        "apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: lonely, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n",
    )
    .unwrap();
    // The CRD appears once the operator installed it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.create(&Default::default(), &tcp).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "CRDs not installed:\n{}",
            common::tail(&dir.path().join("operator.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = api.get("lonely").await.unwrap();
        if t.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "DataStoreNotFound"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no DataStoreNotFound:\n{}",
            common::tail(&dir.path().join("operator.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}
