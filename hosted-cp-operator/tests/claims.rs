//! Two WorkerPools racing for the same machines never both get one: each claim is written
//! with the `resourceVersion` the Machine was read at, so of two writers from the same read
//! exactly one wins. Against a real kube-apiserver + etcd, with the pool controller's own
//! claim choice (`machines::claim::to_claim`) and write (`Inventory::patch_at`).

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_api::worker_pool::LabelSelector;
use tether_api::{Machine, MachineSpec};
use tether_operator::machine_api::inventory::{Inventory, Written};
use tether_operator::machines::claim;
use tether_testkit::TestCluster;

const MACHINES: usize = 12;

async fn enrolled_machine(api: &Api<Machine>, name: &str) {
    let m = Machine {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("rack".to_string(), "r1".to_string())].into()),
            ..Default::default()
        },
        spec: MachineSpec::default(),
        status: None,
    };
    api.create(&PostParams::default(), &m).await.unwrap();
    let status = json!({"status": {
        "phase": "Enrolled",
        "certificate": {"sha256": "00", "keySha256": "00", "pem": "", "notAfter": "2099-01-01T00:00:00Z"},
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// One pool's claiming loop: list, choose, claim with the read `resourceVersion`, until no
/// free machine is left; the names it won.
async fn claim_all(inventory: Inventory, pool: &'static str) -> Vec<String> {
    let selector = LabelSelector {
        match_labels: [("rack".to_string(), "r1".to_string())].into(),
        ..Default::default()
    };
    let mut won = Vec::new();
    loop {
        let machines = inventory.list().await.unwrap();
        let picks = claim::to_claim(&machines, &selector, MACHINES);
        if picks.is_empty() {
            return won;
        }
        for name in picks {
            let m = machines
                .iter()
                .find(|m| m.metadata.name.as_deref() == Some(&name))
                .unwrap();
            if inventory
                .patch_at(m, json!({"spec": {"pool": pool}}))
                .await
                .unwrap()
                == Written::Yes
            {
                won.push(name);
            }
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pools_racing_never_claim_one_machine() {
    let cluster = TestCluster::start()
        .await
        .expect("start kube-apiserver + etcd");
    let client = cluster.client();
    tether_operator::crds::install(&client).await.unwrap();
    let api: Api<Machine> = Api::all(client.clone());
    for i in 0..MACHINES {
        enrolled_machine(&api, &format!("m{i:02}")).await;
    }
    let inventory = Inventory::new(client.clone());
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let race = |pool: &'static str| {
        let (inventory, barrier) = (inventory.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            claim_all(inventory, pool).await
        })
    };
    let (a, b) = (race("team-a/workers"), race("team-b/workers"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    eprintln!("pool a won {} machines, pool b {}", a.len(), b.len());
    let mut winners: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (pool, won) in [("team-a/workers", &a), ("team-b/workers", &b)] {
        for m in won.iter() {
            winners.entry(m.clone()).or_default().push(pool);
        }
    }
    assert_eq!(
        winners.len(),
        MACHINES,
        "every machine claimed: {winners:?}"
    );
    assert!(
        winners.values().all(|w| w.len() == 1),
        "a machine won twice: {winners:?}"
    );
    for m in api.list(&Default::default()).await.unwrap().items {
        let name = m.metadata.name.clone().unwrap();
        assert_eq!(
            m.spec.pool.as_deref(),
            Some(winners[&name][0]),
            "{name}: the recorded claim is the winner's"
        );
    }
}
