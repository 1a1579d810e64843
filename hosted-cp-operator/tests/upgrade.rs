//! Acceptance: a tenant on the previous minor (built lazily into the binary cache) moves up
//! one minor keeping its objects; going back down is refused with a condition and changes
//! nothing.

mod common;

use std::time::Duration;

use common::{Standalone, kubectl};
use kube::api::{Api, Patch, PatchParams};
use tether_api::TenantControlPlane;
use tether_upstream::{Component, Pins};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_one_minor_and_refuse_downgrade() {
    let pins = Pins::default();
    let (prev, cur) = (pins.kubernetes_previous, pins.kubernetes);
    // Built once (minutes), then cached. The operator only offers versions it has.
    for c in [
        Component::KubeApiserver,
        Component::KubeControllerManager,
        Component::KubeScheduler,
        Component::KonnectivityServer,
    ] {
        tether_testkit::binaries::binary_for(c, prev).unwrap();
    }
    let op = Standalone::start().await;
    op.create(&format!(
        "apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {{name: up, namespace: default}}\nspec:\n  kubernetes: {{version: {prev}}}\n"
    ))
    .await;
    let t = op
        .wait_ready("default", "up", Duration::from_secs(90))
        .await;
    assert_eq!(t.status.unwrap().version.as_deref(), Some(prev));
    let admin = op.admin_kubeconfig("up");
    let server = kubectl(&admin, &["version", "-o", "json"]).unwrap();
    assert!(
        server.contains(&format!("\"gitVersion\": \"{prev}\"")),
        "{server}"
    );
    kubectl(&admin, &["create", "namespace", "keep-me"]).unwrap();
    kubectl(
        &admin,
        &[
            "-n",
            "keep-me",
            "create",
            "configmap",
            "data",
            "--from-literal=k=v",
        ],
    )
    .unwrap();

    // N -> N+1.
    let api = Api::<TenantControlPlane>::namespaced(op.client.clone(), "default");
    api.patch(
        "up",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"kubernetes": {"version": cur}}})),
    )
    .await
    .unwrap();
    let t = op
        .wait_for("default", "up", Duration::from_secs(90), "upgraded", |t| {
            t.status.as_ref().is_some_and(|s| {
                s.version.as_deref() == Some(cur)
                    && s.phase == tether_api::TenantControlPlanePhase::Ready
            })
        })
        .await;
    assert_eq!(t.status.unwrap().version.as_deref(), Some(cur));
    let server = kubectl(&admin, &["version", "-o", "json"]).unwrap();
    assert!(
        server.contains(&format!("\"gitVersion\": \"{cur}\"")),
        "{server}"
    );
    let v = kubectl(
        &admin,
        &[
            "-n",
            "keep-me",
            "get",
            "configmap",
            "data",
            "-o",
            "jsonpath={.data.k}",
        ],
    )
    .unwrap();
    assert_eq!(v, "v", "tenant data kept across the upgrade");

    // N+1 -> N is refused; the running version stays and nothing restarts.
    let before = op.pid("default.up", "kube-apiserver");
    api.patch(
        "up",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"kubernetes": {"version": prev}}})),
    )
    .await
    .unwrap();
    let t = op
        .wait_for("default", "up", Duration::from_secs(30), "refused", |t| {
            t.status.as_ref().is_some_and(|s| {
                s.observed_generation == t.metadata.generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "VersionAccepted" && c.status == "False")
            })
        })
        .await;
    let st = t.status.unwrap();
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == "VersionAccepted")
        .unwrap();
    assert!(c.message.contains("downgrade"), "{c:?}");
    assert_eq!(st.version.as_deref(), Some(cur));
    assert_eq!(op.pid("default.up", "kube-apiserver"), before);
    let server = kubectl(&admin, &["version", "-o", "json"]).unwrap();
    assert!(
        server.contains(&format!("\"gitVersion\": \"{cur}\"")),
        "{server}"
    );
}
