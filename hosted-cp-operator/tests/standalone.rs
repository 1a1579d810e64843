//! Acceptance: `tether-operator standalone` with real etcd, kube-apiserver and tenant
//! control planes on the process runtime. One management plane serves the whole scenario
//! (starting one costs seconds); each step asserts what the acceptance list asks.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Standalone, alive, etcdctl, kubectl};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use tether_api::TenantControlPlane;

const TENANT: &str = "apiVersion: tether.dev/v1alpha1
kind: TenantControlPlane
metadata: {name: NAME, namespace: default}
spec:
  kubernetes: {version: v1.36.3}
";

fn tenant(name: &str) -> String {
    TENANT.replace("NAME", name)
}

/// Runs the pinned crane (plain HTTP to the store); returns stdout, trimmed.
fn crane(before: &[&str], path: &Path, after: &[&str]) -> String {
    let bin = tether_operator::binaries::binary(tether_upstream::Component::Crane).unwrap();
    let out = std::process::Command::new(bin)
        .args(before)
        .arg(path)
        .args(after)
        .arg("--insecure")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crane {before:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_tenants_end_to_end() {
    let mut op = Standalone::start().await;

    // --- Two tenants on the shared etcd become Ready. ---------------------------------
    let started = Instant::now();
    op.create(&tenant("alpha")).await;
    op.create(&tenant("beta")).await;
    let alpha = op
        .wait_ready("default", "alpha", Duration::from_secs(90))
        .await;
    op.wait_ready("default", "beta", Duration::from_secs(90))
        .await;
    eprintln!("two tenants Ready in {:?}", started.elapsed());
    let st = alpha.status.unwrap();
    let endpoint = st.endpoint.clone().unwrap();
    assert!(endpoint.starts_with("https://127.0.0.1:"));
    // Where nodes' konnectivity agents dial, on the API's address; konnectivity-server
    // listens there.
    let tunnel = st.konnectivity_endpoint.clone().unwrap();
    assert!(tunnel.starts_with("127.0.0.1:"), "{tunnel}");
    tokio::net::TcpStream::connect(&tunnel)
        .await
        .unwrap_or_else(|e| panic!("konnectivity agent endpoint {tunnel}: {e}"));
    assert_eq!(st.version.as_deref(), Some("v1.36.3"));
    assert_eq!(
        st.kubeconfig_secret.as_deref(),
        Some("alpha-admin-kubeconfig")
    );
    let ca = op.secret("default", "alpha-pki", "ca.crt");
    assert_eq!(
        st.ca_hash.as_deref(),
        Some(tether_operator::x509::ca_hash(&ca).unwrap().as_str())
    );

    // --- The admin kubeconfig works with kubectl. -------------------------------------
    let admin = op.admin_kubeconfig("alpha");
    let ns = kubectl(&admin, &["get", "namespaces", "-o", "name"]).unwrap();
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    kubectl(&admin, &["create", "namespace", "made-by-test"]).unwrap();
    // kubeadm's add-ons are installed: CoreDNS behind kube-dns at the tenth service IP, and
    // kube-proxy pointed at the tenant endpoint.
    let dns_ip = kubectl(
        &admin,
        &[
            "-n",
            "kube-system",
            "get",
            "service",
            "kube-dns",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    )
    .unwrap();
    assert_eq!(dns_ip, "10.96.0.10");
    assert!(
        kubectl(
            &admin,
            &["-n", "kube-system", "get", "deployment", "coredns"]
        )
        .is_ok()
    );
    let kp = kubectl(
        &admin,
        &[
            "-n",
            "kube-system",
            "get",
            "configmap",
            "kube-proxy",
            "-o",
            "jsonpath={.data.kubeconfig\\.conf}",
        ],
    )
    .unwrap();
    assert!(kp.contains(&format!("server: {endpoint}")), "{kp}");
    assert!(
        kubectl(
            &admin,
            &["-n", "kube-system", "get", "daemonset", "kube-proxy"]
        )
        .is_ok()
    );
    assert!(kubectl(&admin, &["get", "namespace", "made-by-test"]).is_ok());

    // --- No tenant-wide join token and no blanket node-client approval (per-Machine
    // tokens and approval come with WorkerPools). A bootstrap token made by hand reads
    // cluster-info and creates a CSR, and can do nothing more. ---------------------------
    assert!(
        op.kubectl(&["get", "secret", "alpha-bootstrap-token"])
            .is_err(),
        "no tenant-wide token is kept in the management cluster"
    );
    assert!(
        kubectl(
            &admin,
            &[
                "get",
                "clusterrolebinding",
                "kubeadm:node-autoapprove-bootstrap"
            ]
        )
        .is_err(),
        "kube-controller-manager must not approve every bootstrapper's node-client CSR"
    );
    let token = "abcdef.0123456789abcdef";
    let token_secret = op.dir.join("token.yaml");
    std::fs::write(
        &token_secret,
        "apiVersion: v1\nkind: Secret\ntype: bootstrap.kubernetes.io/token\n\
         metadata: {name: bootstrap-token-abcdef, namespace: kube-system}\n\
         stringData: {token-id: abcdef, token-secret: 0123456789abcdef, \
         usage-bootstrap-authentication: 'true', usage-bootstrap-signing: 'true'}\n",
    )
    .unwrap();
    kubectl(&admin, &["apply", "-f", token_secret.to_str().unwrap()]).unwrap();
    let token_kc = op.dir.join("alpha.token.kubeconfig");
    std::fs::write(&token_kc, token_kubeconfig(&endpoint, &ca, token)).unwrap();
    // The controller-manager's bootstrapsigner signs cluster-info for the token shortly
    // after both exist.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ci = kubectl(
            &token_kc,
            &[
                "-n",
                "kube-public",
                "get",
                "configmap",
                "cluster-info",
                "-o",
                "yaml",
            ],
        )
        .unwrap();
        if ci.contains("jws-kubeconfig-abcdef") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster-info not signed for the token: {ci}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let csr = node_csr("system:node:worker-1");
    let csr_yaml = format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: node-csr-test}}\nspec:\n  signerName: kubernetes.io/kube-apiserver-client-kubelet\n  usages: [digital signature, client auth]\n  request: {}\n",
        base64(&csr)
    );
    let csr_file = op.dir.join("csr.yaml");
    std::fs::write(&csr_file, csr_yaml).unwrap();
    kubectl(&token_kc, &["create", "-f", csr_file.to_str().unwrap()]).unwrap();
    // The token must not be able to do more than bootstrapping.
    assert!(kubectl(&token_kc, &["get", "secrets", "-A"]).is_err());

    // The DataStore knows who lives on it.
    let used = op
        .kubectl(&[
            "get",
            "datastore",
            "default",
            "-o",
            "jsonpath={.status.usedBy}",
        ])
        .unwrap();
    assert!(
        used.contains("default/alpha") && used.contains("default/beta"),
        "{used}"
    );

    // --- Isolation: each tenant's etcd credentials read only its own prefix. ----------
    let ds_endpoint = {
        let out = op
            .kubectl(&[
                "get",
                "datastore",
                "default",
                "-o",
                "jsonpath={.spec.endpoints[0]}",
            ])
            .unwrap();
        format!("https://{}", out.trim())
    };
    for (me, other) in [("alpha", "beta"), ("beta", "alpha")] {
        let dir = op.dir.join(format!("{me}-etcd-creds"));
        std::fs::create_dir_all(&dir).unwrap();
        for k in ["ca.crt", "client.crt", "client.key"] {
            std::fs::write(
                dir.join(k),
                op.secret("default", &format!("{me}-datastore"), k),
            )
            .unwrap();
        }
        let run = |args: &[&str]| {
            etcdctl(
                &ds_endpoint,
                &dir.join("ca.crt"),
                &dir.join("client.crt"),
                &dir.join("client.key"),
                args,
            )
        };
        let own = run(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("/tether/default/{me}/"),
        ])
        .unwrap();
        assert!(
            own.contains(&format!("/tether/default/{me}/namespaces/kube-system")),
            "{me} cannot read its own keys: {own}"
        );
        let theirs = run(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("/tether/default/{other}/"),
        ]);
        assert!(
            matches!(&theirs, Err(e) if e.contains("permission denied")),
            "{me} read {other}'s keys: {theirs:?}"
        );
        let all = run(&["get", "--prefix", "--keys-only", "/"]);
        assert!(
            matches!(&all, Err(e) if e.contains("permission denied")),
            "{me} listed the whole keyspace: {all:?}"
        );
        let write = run(&["put", &format!("/tether/default/{other}/x"), "y"]);
        assert!(
            matches!(&write, Err(e) if e.contains("permission denied")),
            "{me} wrote into {other}: {write:?}"
        );
    }

    // --- kill -9 of the tenant API server: Ready again within 10 s. -------------------
    let old = op.pid("default.alpha", "kube-apiserver").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let client =
        tether_operator::kube::client_from_kubeconfig(&std::fs::read_to_string(&admin).unwrap())
            .await
            .unwrap();
    tether_operator::kube::wait_readyz(&client, Duration::from_secs(10))
        .await
        .expect("apiserver back within 10 s");
    let back = killed.elapsed();
    eprintln!("apiserver killed -> /readyz ok in {back:?}");
    assert!(back < Duration::from_secs(10));
    assert_ne!(op.pid("default.alpha", "kube-apiserver"), Some(old));
    assert!(
        kubectl(&admin, &["get", "namespace", "made-by-test"]).is_ok(),
        "tenant data survived"
    );

    // --- Bad input: a condition with a reason, and no objects. -------------------------
    op.create("apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: bad, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n  networkProfile: {serviceCIDR: 10.96.0.0/16, podCIDR: 10.96.0.0/12}\n").await;
    let bad = op
        .wait_for("default", "bad", Duration::from_secs(30), "refused", |t| {
            t.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "SpecValid" && c.status == "False")
            })
        })
        .await;
    let c = bad
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "SpecValid")
        .unwrap();
    assert!(c.message.contains("overlaps serviceCIDR"), "{c:?}");
    // …and an Event says the same to `kubectl describe`.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = op
            .kubectl(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=bad",
                "-o",
                "jsonpath={.items[*].reason}",
            ])
            .unwrap();
        if ev.contains("InvalidSpec") {
            break;
        }
        assert!(Instant::now() < deadline, "no InvalidSpec event: {ev:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    op.create("apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: nods, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n  dataStore: missing\n").await;
    let nods = op
        .wait_for("default", "nods", Duration::from_secs(30), "refused", |t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "DataStoreNotFound"))
        })
        .await;
    assert_eq!(
        nods.status.unwrap().phase,
        tether_api::TenantControlPlanePhase::NotReady
    );
    // A DataStore whose credentials cannot be read is refused before anything is made.
    let broken = op.dir.join("broken-ds.yaml");
    std::fs::write(&broken, "apiVersion: tether.dev/v1alpha1\nkind: DataStore\nmetadata: {name: broken}\nspec:\n  driver: etcd\n  endpoints: [\"127.0.0.1:1\"]\n  tlsConfig:\n    certificateAuthority:\n      certificate: {name: nope, key: ca.crt}\n      privateKey: {name: nope, key: ca.key}\n    clientCertificate:\n      certificate: {name: nope, key: tls.crt}\n      privateKey: {name: nope, key: tls.key}\n").unwrap();
    op.kubectl(&["apply", "-f", broken.to_str().unwrap()])
        .unwrap();
    op.create("apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: nouse, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n  dataStore: broken\n").await;
    op.wait_for(
        "default",
        "nouse",
        Duration::from_secs(30),
        "refused",
        |t| {
            t.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.reason == "DataStoreUnusable" && c.message.contains("nope"))
            })
        },
    )
    .await;
    for name in ["bad", "nods", "nouse"] {
        let secrets = op
            .kubectl(&[
                "get",
                "secrets",
                "-l",
                &format!("tether.dev/tenant={name}"),
                "-o",
                "name",
            ])
            .unwrap();
        assert!(secrets.trim().is_empty(), "{name} created {secrets}");
        assert!(
            !op.dir
                .join("tenants")
                .join(format!("default.{name}"))
                .join("run")
                .exists()
        );
    }
    // The CRD's CEL rule refuses a nodePort on a ClusterIP service at the API.
    let cel = op.dir.join("cel.yaml");
    std::fs::write(&cel, "apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: cel, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n  controlPlane: {service: {type: ClusterIP, nodePort: 30001}}\n").unwrap();
    let err = op
        .kubectl(&["create", "-f", cel.to_str().unwrap()])
        .unwrap_err();
    assert!(
        err.contains("nodePort is only allowed with type NodePort"),
        "{err}"
    );
    // A skip / unknown version is refused and nothing changes.
    let api = Api::<TenantControlPlane>::namespaced(op.client.clone(), "default");
    let before = op.pid("default.beta", "kube-apiserver");
    api.patch(
        "beta",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"kubernetes": {"version": "v1.38.0"}}})),
    )
    .await
    .unwrap();
    let refused = op
        .wait_for("default", "beta", Duration::from_secs(30), "refused", |t| {
            t.status.as_ref().is_some_and(|s| {
                s.observed_generation == t.metadata.generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "SpecValid" && c.status == "False")
            })
        })
        .await;
    assert_eq!(refused.status.unwrap().version.as_deref(), Some("v1.36.3"));
    assert_eq!(
        op.pid("default.beta", "kube-apiserver"),
        before,
        "a refused change restarted components"
    );
    api.patch(
        "beta",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"kubernetes": {"version": "v1.36.3"}}})),
    )
    .await
    .unwrap();
    op.wait_ready("default", "beta", Duration::from_secs(30))
        .await;

    // --- The artifact store: published, accepts a push, serves it back. --------------
    let store =
        tether_testkit::published::artifact_store(&op.dir.join("management.kubeconfig")).unwrap();
    assert!(store.starts_with("127.0.0.1:"), "{store}");
    let layer = op.dir.join("layer.tar");
    std::fs::write(op.dir.join("hello"), b"hello from the store\n").unwrap();
    let tar = std::process::Command::new("tar")
        .arg("-C")
        .arg(&op.dir)
        .arg("-cf")
        .arg(&layer)
        .arg("hello")
        .status()
        .unwrap();
    assert!(tar.success());
    let image = format!("{store}/test/hello:v1");
    let pushed = crane(
        &["append", "--oci-empty-base", "-f"],
        &layer,
        &["-t", &image],
    );
    let digest = crane(&["digest"], Path::new(&image), &[]);
    assert!(pushed.contains(&digest), "{pushed} / {digest}");

    // --- Operator crash: on restart no orphans, no duplicates, tenants converge. -------
    let orphans: Vec<u32> = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "konnectivity-server",
    ]
    .iter()
    .filter_map(|c| op.pid("default.alpha", c))
    .collect();
    assert_eq!(orphans.len(), 4);
    op.crash();
    assert!(
        orphans.iter().all(|p| alive(*p)),
        "children survive an operator crash"
    );
    let dir = op.dir.clone();
    let tmp = op.tmp.take();
    let op2 = Standalone::start_in(&dir).await;
    let restarted = Instant::now();
    for p in &orphans {
        assert!(!alive(*p), "process {p} of the crashed operator still runs");
    }
    op2.wait_for(
        "default",
        "alpha",
        Duration::from_secs(60),
        "serving again",
        |t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.phase == tether_api::TenantControlPlanePhase::Ready)
        },
    )
    .await;
    tether_operator::kube::wait_readyz(&client, Duration::from_secs(60))
        .await
        .unwrap();
    eprintln!(
        "operator restart -> alpha /readyz in {:?}",
        restarted.elapsed()
    );
    assert!(
        kubectl(&admin, &["get", "namespace", "made-by-test"]).is_ok(),
        "tenant data survived the restart"
    );
    // Only this test's processes: another management plane on the machine may run a
    // tenant of the same name.
    let count = |name: &str| {
        let tenant = dir.join("tenants").join(format!("default.{name}"));
        let tenant_str = tenant.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("cmdline")).is_ok_and(|c| {
                    c.contains(&tenant_str)
                        || std::fs::read_link(e.path().join("cwd")).is_ok_and(|p| p == tenant)
                })
            })
            .count()
    };
    assert_eq!(count("alpha"), 4, "exactly one set of alpha's components");
    assert_eq!(
        crane(&["digest"], Path::new(&image), &[]),
        digest,
        "the store's content survived the crash, at the same address"
    );

    // --- Delete: processes, keys + etcd user, Secrets gone. ----------------------------
    let beta_pids: Vec<u32> = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "konnectivity-server",
    ]
    .iter()
    .filter_map(|c| op2.pid("default.beta", c))
    .collect();
    assert_eq!(beta_pids.len(), 4);
    let api2 = Api::<TenantControlPlane>::namespaced(op2.client.clone(), "default");
    api2.delete("beta", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while api2.get_opt("beta").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "beta not deleted:\n{}",
            common::tail(&dir.join("operator.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in &beta_pids {
        assert!(!alive(*p), "beta process {p} survived deletion");
    }
    assert!(!dir.join("tenants/default.beta").exists());
    let secrets = op2
        .kubectl(&[
            "get",
            "secrets",
            "-l",
            "tether.dev/tenant=beta",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(secrets.trim().is_empty(), "{secrets}");
    let root = dir.join("datastore/admin");
    let root_run = |args: &[&str]| {
        etcdctl(
            &ds_endpoint,
            &root.join("ca.crt"),
            &root.join("root.crt"),
            &root.join("root.key"),
            args,
        )
    };
    assert_eq!(
        root_run(&["get", "--prefix", "--keys-only", "/tether/default/beta/"])
            .unwrap()
            .trim(),
        ""
    );
    assert!(
        root_run(&["user", "get", "tether.default.beta"]).is_err(),
        "etcd user of beta remains"
    );
    assert!(
        root_run(&["role", "get", "tether.default.beta"]).is_err(),
        "etcd role of beta remains"
    );
    let used = op2
        .kubectl(&[
            "get",
            "datastore",
            "default",
            "-o",
            "jsonpath={.status.usedBy}",
        ])
        .unwrap();
    assert!(
        used.contains("default/alpha") && !used.contains("default/beta"),
        "{used}"
    );
    // …and nothing of alpha went with it.
    assert!(
        !root_run(&["get", "--prefix", "--keys-only", "/tether/default/alpha/"])
            .unwrap()
            .trim()
            .is_empty()
    );
    assert!(kubectl(&admin, &["get", "namespace", "made-by-test"]).is_ok());
    drop(op2);
    drop(tmp);
}

fn token_kubeconfig(server: &str, ca: &[u8], token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: b\n  user:\n    token: {token}\ncontexts:\n- name: t\n  context: {{cluster: t, user: b}}\ncurrent-context: t\n",
        base64(ca)
    )
}

fn base64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A PEM CSR for a kubelet client certificate (`CN=system:node:…, O=system:nodes`).
fn node_csr(cn: &str) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "system:nodes");
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    let key = rcgen::KeyPair::generate().unwrap();
    params
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
        .into_bytes()
}
