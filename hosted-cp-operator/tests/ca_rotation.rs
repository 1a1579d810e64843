//! Acceptance: CA rotation on an annotation keeps old kubeconfigs working until the
//! rotation completes, and only the new CA afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{Standalone, kubectl};
use kube::api::{Api, Patch, PatchParams};
use tether_api::TenantControlPlane;

async fn annotate(op: &Standalone, key: &str, value: &str) {
    Api::<TenantControlPlane>::namespaced(op.client.clone(), "default")
        .patch(
            "rot",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .unwrap();
}

/// Retries kubectl for a while: components restart when their certificates change.
async fn works(kubeconfig: &std::path::Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if kubectl(
            kubeconfig,
            &["get", "namespace", "kube-system", "--request-timeout=2s"],
        )
        .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_keeps_old_kubeconfigs_until_complete() {
    let op = Standalone::start().await;
    op.create("apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: rot, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n").await;
    let t = op
        .wait_ready("default", "rot", Duration::from_secs(90))
        .await;
    let old_hash = t.status.unwrap().ca_hash.unwrap();
    let old_kc = op.dir.join("old.kubeconfig");
    std::fs::copy(op.admin_kubeconfig("rot"), &old_kc).unwrap();
    assert!(works(&old_kc).await);

    annotate(&op, "tether.dev/rotate-ca", "r1").await;
    let t = op
        .wait_for("default", "rot", Duration::from_secs(60), "trusting", |t| {
            t.status.as_ref().is_some_and(|s| {
                s.ca_rotation
                    .as_ref()
                    .is_some_and(|r| r.id == "r1" && r.phase == "Trusting")
                    && s.phase == tether_api::TenantControlPlanePhase::Ready
            })
        })
        .await;
    assert_eq!(
        t.status.unwrap().ca_hash.unwrap(),
        old_hash,
        "the serving CA is unchanged while trusting"
    );
    let mid_kc = op.dir.join("mid.kubeconfig");
    std::fs::copy(op.admin_kubeconfig("rot"), &mid_kc).unwrap();
    assert_ne!(
        std::fs::read(&mid_kc).unwrap(),
        std::fs::read(&old_kc).unwrap()
    );
    assert!(
        works(&old_kc).await,
        "old kubeconfig must work while the rotation is in progress"
    );
    assert!(
        works(&mid_kc).await,
        "new kubeconfig works during the rotation"
    );

    annotate(&op, "tether.dev/rotate-ca-complete", "r1").await;
    let t = op
        .wait_for(
            "default",
            "rot",
            Duration::from_secs(60),
            "completed",
            |t| {
                t.status.as_ref().is_some_and(|s| {
                    s.ca_rotation
                        .as_ref()
                        .is_some_and(|r| r.phase == "Completed")
                        && s.phase == tether_api::TenantControlPlanePhase::Ready
                })
            },
        )
        .await;
    let new_hash = t.status.unwrap().ca_hash.unwrap();
    assert_ne!(new_hash, old_hash);
    let ca = op.secret("default", "rot-pki", "ca.crt");
    assert_eq!(new_hash, tether_operator::x509::ca_hash(&ca).unwrap());
    // Kubeconfigs handed out during the rotation keep working; the old one no longer does.
    assert!(
        works(&mid_kc).await,
        "kubeconfig from the rotation works after it"
    );
    let new_kc = op.admin_kubeconfig("rot");
    assert!(works(&new_kc).await);
    let err = kubectl(
        &old_kc,
        &["get", "namespace", "kube-system", "--request-timeout=5s"],
    )
    .unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("x509") || err.contains("Unauthorized"),
        "{err}"
    );
}
