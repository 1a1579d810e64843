//! The cluster boot source against a real kube-apiserver with the CRDs applied: unknown MACs
//! become exactly one `Machine` in phase `Discovered` (even with two servers racing), and a
//! machine with an image gets that image's script over HTTP.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use tether_api::{Artifact, BootImage, BootImageSpec, Machine, MachinePhase};
use tether_boot::Mac;
use tether_pxe::artifacts::Store;
use tether_pxe::source::BootSource;
use tether_pxe::source::kube::{KubeSource, MAC_LABEL};
use tether_pxe::tftp::Files;
use tether_testkit::TestCluster;

async fn apply_crd(client: &kube::Client, crd: CustomResourceDefinition) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("tether-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    let start = Instant::now();
    loop {
        let c = crds.get(&name).await.unwrap();
        let ok = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} not Established"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn image(version: &str, kernel: &str, initrd: &str) -> BootImageSpec {
    let art = |sha: &str| Artifact {
        url: format!("http://images.example.invalid/{sha}"),
        sha256: sha.into(),
        size: 1,
    };
    BootImageSpec {
        version: version.into(),
        artifacts: BTreeMap::from([
            ("kernel".into(), art(kernel)),
            ("initrd".into(), art(initrd)),
        ]),
        cmdline: "console=ttyS0".into(),
        manifest_signature: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_macs_are_discovered_once_and_images_are_served() {
    let cluster = TestCluster::start().await.expect("etcd + kube-apiserver");
    let client = cluster.client();
    apply_crd(&client, Machine::crd()).await;
    apply_crd(&client, BootImage::crd()).await;
    let images: Api<BootImage> = Api::all(client.clone());
    let (k1, i1, k2, i2) = (
        "1".repeat(64),
        "2".repeat(64),
        "3".repeat(64),
        "4".repeat(64),
    );
    images
        .create(
            &PostParams::default(),
            &BootImage::new("default", image("disc-1", &k1, &i1)),
        )
        .await
        .unwrap();
    images
        .create(
            &PostParams::default(),
            &BootImage::new("prod", image("2026.11.1", &k2, &i2)),
        )
        .await
        .unwrap();

    // Two servers on one segment see the same unknown MAC at the same moment.
    let a = KubeSource::new(client.clone(), "default", "default");
    let b = KubeSource::new(client.clone(), "default", "default");
    let mac: Mac = "52:54:00:de:ad:01".parse().unwrap();
    let (ra, rb) = tokio::join!(a.assignment(mac), b.assignment(mac));
    let (ra, rb) = (ra.expect("server a"), rb.expect("server b"));
    assert_eq!(ra.machine, "mac-525400dead01");
    assert_eq!(rb.machine, ra.machine);
    assert_eq!(ra.image.version, "disc-1");
    assert!(
        ra.discovered ^ rb.discovered,
        "exactly one server created it"
    );
    let machines: Api<Machine> = Api::all(client.clone());
    let list = machines
        .list(&ListParams::default().labels(&format!("{MAC_LABEL}=52-54-00-de-ad-01")))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "one Machine for the MAC");
    let m = &list.items[0];
    assert_eq!(m.spec.macs, vec!["52:54:00:de:ad:01".to_string()]);
    assert_eq!(
        m.status.as_ref().map(|s| s.phase),
        Some(MachinePhase::Discovered)
    );
    // Asking again changes nothing.
    let again = a.assignment(mac).await.unwrap();
    assert!(!again.discovered);
    assert_eq!(
        machines
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // A user assigns the prod image; the HTTP server now renders that image's script.
    machines
        .patch(
            "mac-525400dead01",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"image": "prod"}})),
        )
        .await
        .unwrap();
    let (addr, stop, _m) =
        common::start_http(Arc::new(a.clone()), Store::default(), Files::default(), 4).await;
    let r = tokio::task::spawn_blocking(move || {
        common::get(addr, "GET", "/boot/52-54-00-de-ad-01.ipxe", &[])
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let script = r.text();
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(script.contains("image 2026.11.1"), "{script}");
    assert!(
        script.contains(&format!("http://images.example.invalid/{k2}")),
        "{script}"
    );
    assert!(
        script.contains(&format!("http://images.example.invalid/{i2}")),
        "{script}"
    );
    assert!(
        script.contains("tether.token=abcdef.0123456789abcdef"),
        "{script}"
    );

    // A machine that names a missing image gets a clear refusal, and nothing is created.
    machines
        .patch(
            "mac-525400dead01",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"image": "nope"}})),
        )
        .await
        .unwrap();
    let err = a.assignment(mac).await.unwrap_err();
    assert!(err.to_string().contains("\"nope\""), "{err}");
    let r = tokio::task::spawn_blocking(move || {
        common::get(addr, "GET", "/boot/52-54-00-de-ad-01.ipxe", &[])
    })
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    // A BootImage whose values would inject into the script is refused at render time.
    images
        .create(
            &PostParams::default(),
            &BootImage::new(
                "evil",
                BootImageSpec {
                    cmdline: "console=ttyS0 ${net0/ip}".into(),
                    ..image("evil-1", &k1, &i1)
                },
            ),
        )
        .await
        .unwrap();
    machines
        .patch(
            "mac-525400dead01",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"image": "evil"}})),
        )
        .await
        .unwrap();
    let r = tokio::task::spawn_blocking(move || {
        common::get(addr, "GET", "/boot/52-54-00-de-ad-01.ipxe", &[])
    })
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    assert!(
        !r.text().contains("net0"),
        "nothing of the bad value is echoed"
    );
    assert_eq!(
        machines
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let _ = stop.send(true);
}
