//! `tether-operator token …` against a real `tether-operator standalone`: what it prints is
//! what a node can use, what it refuses creates nothing, and the machine API it points at
//! is the one standalone serves (enrolling with the printed user-data works).

mod common;

use std::process::Command;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use tether_api::machine_api::NAMESPACE;
use tether_api::token::{KIND_LABEL, TokenRecord, secret_name};
use tether_boot::Token;
use tether_boot::seed::Seed;

fn token_cmd(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-operator"))
        .arg("token")
        .args(args)
        .env("KUBECONFIG", dir.join("management.kubeconfig"))
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn token_create_list_delete_and_user_data() {
    let op = common::Standalone::start().await;
    let secrets: Api<Secret> = Api::namespaced(op.client.clone(), NAMESPACE);
    let count = || async {
        secrets
            .list(&ListParams::default().labels(KIND_LABEL))
            .await
            .unwrap()
            .items
            .len()
    };

    // Like kubeadm: the token and nothing else on stdout.
    let (ok, out, err) = token_cmd(
        &op.dir,
        &[
            "create", "--ttl", "1h", "--uses", "2", "--labels", "rack=r1",
        ],
    );
    assert!(ok, "{err}");
    let token: Token = out.trim().parse().expect("stdout is exactly <id>.<secret>");
    assert_eq!(out, format!("{token}\n"));
    let rec =
        TokenRecord::from_secret(&secrets.get(&secret_name(token.id())).await.unwrap()).unwrap();
    assert_eq!(rec.uses_left, Some(2));
    assert_eq!(rec.labels["rack"], "r1");
    assert!(token.matches(&rec.secret_sha256));

    // --user-data: a #cloud-config whose seed names the API standalone serves.
    let (ok, out, err) = token_cmd(
        &op.dir,
        &[
            "create",
            "--ttl",
            "15m",
            "--user-data",
            "--pool",
            "team-a/workers",
        ],
    );
    assert!(ok, "{err}");
    let seed = Seed::from_user_data(&out).expect("user-data parses back");
    let pool = TokenRecord::from_secret(&secrets.get(&secret_name(seed.token.id())).await.unwrap())
        .unwrap();
    assert_eq!(pool.pool.as_deref(), Some("team-a/workers"));
    let cm = op
        .kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "configmap",
            "tether-machine-api",
            "-o",
            "jsonpath={.data.url} {.data.caPin}",
        ])
        .unwrap();
    assert_eq!(cm, format!("{} {}", seed.api, seed.ca_pin));

    // A node enrolls with it (the real agent library, a tree standing in for /proc).
    let node = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(node.path().join("proc")).unwrap();
    std::fs::write(
        node.path().join("proc/cmdline"),
        "tether.mac=52:54:00:00:0f:01\n",
    )
    .unwrap();
    let state = tether_agent::identity::StateDir::new(node.path().join("state"));
    let id =
        tether_agent::enroll::enroll(node.path(), &state, Some(seed.clone()), &Default::default())
            .await
            .expect("enrolls against standalone's machine API");
    assert_eq!(id.enrolled.machine, "mac-525400000f01");
    let pool_of = op
        .kubectl(&[
            "get",
            "machine",
            "mac-525400000f01",
            "-o",
            "jsonpath={.spec.pool}",
        ])
        .unwrap();
    assert_eq!(
        pool_of, "team-a/workers",
        "the token's pool pre-assigns the machine"
    );

    // list shows ids and never secrets.
    let (ok, out, _) = token_cmd(&op.dir, &["list"]);
    assert!(ok);
    assert!(
        out.contains(token.id()) && out.contains(seed.token.id()),
        "{out}"
    );
    assert!(
        !out.contains(&token.to_string()) && !out.contains(&seed.token.to_string()),
        "{out}"
    );

    // Refusals: clear message, non-zero, nothing created.
    let before = count().await;
    for (args, want) in [
        (vec!["create", "--ttl", "0s"], "--ttl must be positive"),
        (vec!["create", "--ttl", "1h", "--uses", "0"], "--uses 0"),
        (
            vec!["create", "--ttl", "1h", "--pool", "no-slash"],
            "NAMESPACE/NAME",
        ),
        (vec!["create", "--ttl", "1h", "--labels", "a=b c"], "label"),
        (vec!["create", "--ttl", "soon"], "invalid value"),
        (vec!["delete", "../etc"], "token id"),
        (vec!["delete", "zzzzzz"], "no token zzzzzz"),
    ] {
        let (ok, _, err) = token_cmd(&op.dir, &args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(count().await, before, "refused commands created nothing");

    // delete: the token is gone and cannot enroll anything.
    let (ok, _, err) = token_cmd(&op.dir, &["delete", token.id()]);
    assert!(ok, "{err}");
    assert!(
        secrets
            .get_opt(&secret_name(token.id()))
            .await
            .unwrap()
            .is_none()
    );
}
