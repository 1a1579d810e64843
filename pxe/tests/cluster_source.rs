//! The cluster boot source against a real kube-apiserver with the CRDs applied: unknown MACs
//! seen on the segment become exactly one `Machine` in phase `Discovered` (even with two
//! servers racing) and others none; every script carries a fresh single-use boot token bound
//! to its MAC, recorded as a Secret, and the machine API URL and pin of the ConfigMap; a
//! missing ConfigMap or a bad image creates nothing; expired tokens are collected.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use tether_api::machine::MAC_LABEL;
use tether_api::machine_api::{CONFIG_MAP, KEY_CA_PIN, KEY_URL, NAMESPACE};
use tether_api::token::{Admission, KIND_LABEL, Refusal, SECRET_TYPE, TokenRecord};
use tether_api::{Artifact, BootImage, BootImageSpec, Machine, MachinePhase};
use tether_boot::{CaPin, Mac, Token};
use tether_pxe::artifacts::Store;
use tether_pxe::source::BootSource;
use tether_pxe::source::kube::{KubeOptions, KubeSource, SERVER_LABEL};
use tether_pxe::tftp::Files;
use tether_testkit::TestCluster;
use time::OffsetDateTime;

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

fn options(server_id: &str) -> KubeOptions {
    KubeOptions {
        namespace: NAMESPACE.into(),
        default_image: "default".into(),
        api_url: None,
        ca_pin: None,
        server_id: server_id.into(),
    }
}

const API_URL: &str = "https://10.99.0.1:9443";

fn pin() -> CaPin {
    format!("sha256:{}", "5a".repeat(32)).parse().unwrap()
}

async fn boot_tokens(client: &kube::Client) -> Vec<Secret> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    secrets
        .list(&ListParams::default().labels(&format!("{KIND_LABEL}=boot")))
        .await
        .unwrap()
        .items
}

async fn machines(client: &kube::Client) -> usize {
    let m: Api<Machine> = Api::all(client.clone());
    m.list(&ListParams::default()).await.unwrap().items.len()
}

fn get(addr: std::net::SocketAddr, path: &'static str) -> tokio::task::JoinHandle<common::Resp> {
    tokio::task::spawn_blocking(move || common::get(addr, "GET", path, &[]))
}

fn token_of(script: &str) -> Token {
    let word = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tether.token="))
        .unwrap_or_else(|| panic!("no token in {script}"));
    word.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_tokens_and_refusals_against_a_real_apiserver() {
    let cluster = TestCluster::start().await.expect("etcd + kube-apiserver");
    let client = cluster.client();
    apply_crd(&client, Machine::crd()).await;
    apply_crd(&client, BootImage::crd()).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(NAMESPACE.into());
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
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
    let a = KubeSource::new(client.clone(), options("10.99.0.1")).unwrap();
    let b = KubeSource::new(client.clone(), options("10.99.0.2")).unwrap();
    let mac: Mac = "52:54:00:de:ad:01".parse().unwrap();
    let (addr, stop, metrics, recent) =
        common::start_http(Arc::new(a.clone()), Store::default(), Files::default(), 4).await;
    recent.saw(mac);

    // No machine API published yet: a clear 503 with the reason, and nothing created.
    let err = a.assignment(mac, true).await.unwrap_err().to_string();
    assert!(
        err.contains("ConfigMap tether-system/tether-machine-api not found"),
        "{err}"
    );
    let r = get(addr, "/boot/52-54-00-de-ad-01.ipxe").await.unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.text().contains("machine API not published"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("retry-after"), Some("10"));
    assert_eq!(machines(&client).await, 0, "no Machine");
    assert!(boot_tokens(&client).await.is_empty(), "no token");

    // The operator publishes it.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (KEY_URL.to_string(), API_URL.to_string()),
            (KEY_CA_PIN.to_string(), pin().to_string()),
        ])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();

    // Two servers on one segment see the same unknown MAC at the same moment.
    let (ra, rb) = tokio::join!(a.assignment(mac, true), b.assignment(mac, true));
    let (ra, rb) = (ra.expect("server a"), rb.expect("server b"));
    assert_eq!(ra.machine, "mac-525400dead01");
    assert_eq!(rb.machine, ra.machine);
    assert_eq!(ra.image.version, "disc-1");
    assert!(
        ra.discovered ^ rb.discovered,
        "exactly one server created it"
    );
    let machine_api: Api<Machine> = Api::all(client.clone());
    let list = machine_api
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
    assert!(
        boot_tokens(&client).await.is_empty(),
        "minted, not yet committed"
    );

    // An unknown MAC that never DHCP'd here: 404, nothing created.
    let err = a
        .assignment("52:54:00:de:ad:99".parse().unwrap(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("has not DHCP'd"), "{err}");
    let r = get(addr, "/boot/52-54-00-de-ad-99.ipxe").await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(machines(&client).await, 1);

    // Two scripts for one MAC: two different tokens, each a Secret bound to the MAC,
    // single use, expiring in 15 minutes; the scripts carry the ConfigMap's URL and pin.
    let before = OffsetDateTime::now_utc();
    let s1 = get(addr, "/boot/52-54-00-de-ad-01.ipxe").await.unwrap();
    let s2 = get(addr, "/boot/52-54-00-de-ad-01.ipxe").await.unwrap();
    let after = OffsetDateTime::now_utc();
    assert_eq!((s1.status, s2.status), (200, 200), "{}", s1.text());
    let (t1, t2) = (token_of(&s1.text()), token_of(&s2.text()));
    assert_ne!(t1, t2, "a fresh token per script");
    for s in [&s1, &s2] {
        let text = s.text();
        assert!(text.contains(&format!("tether.api={API_URL} ")), "{text}");
        assert!(text.contains(&format!("tether.ca={} ", pin())), "{text}");
        assert!(text.contains("tether.mac=52:54:00:de:ad:01"), "{text}");
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    for t in [&t1, &t2] {
        let s = secrets
            .get(&tether_api::token::secret_name(t.id()))
            .await
            .unwrap();
        assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(KIND_LABEL).map(String::as_str), Some("boot"));
        assert_eq!(
            labels.get(SERVER_LABEL).map(String::as_str),
            Some("10.99.0.1")
        );
        assert_eq!(
            labels.get(MAC_LABEL).map(String::as_str),
            Some("52-54-00-de-ad-01")
        );
        let rec = TokenRecord::from_secret(&s).unwrap();
        assert_eq!(rec.mac, Some(mac));
        assert_eq!(rec.uses_left, Some(1));
        let ttl = time::Duration::minutes(15);
        assert!(rec.expires >= before + ttl - time::Duration::seconds(1));
        assert!(rec.expires <= after + ttl + time::Duration::seconds(1));
        assert!(
            !s.data
                .iter()
                .flatten()
                .any(|(_, v)| v.0 == t.to_string().into_bytes()),
            "the secret half is never stored"
        );
        let now = OffsetDateTime::now_utc();
        assert_eq!(rec.admit(t, now, Some(mac), "key-1"), Ok(Admission::Spend));
        let other: Mac = "52:54:00:de:ad:02".parse().unwrap();
        assert_eq!(
            rec.admit(t, now, Some(other), "key-1"),
            Err(Refusal::WrongMac { bound: mac })
        );
        assert_eq!(
            rec.admit(
                t,
                now + ttl + time::Duration::seconds(2),
                Some(mac),
                "key-1"
            ),
            Err(Refusal::Expired)
        );
        let mut spent = rec.clone();
        spent.spend("key-1", "mac-525400dead01");
        assert_eq!(
            spent.admit(t, now, Some(mac), "key-2"),
            Err(Refusal::UsedUp),
            "single use"
        );
    }
    assert_eq!(boot_tokens(&client).await.len(), 2);

    // A known machine whose MAC has not DHCP'd here gets its script but no token.
    let quiet = Arc::new(tether_pxe::recent::RecentMacs::new(
        4,
        Duration::from_secs(600),
    ));
    assert!(!quiet.seen(mac));
    let a2 = a.assignment(mac, false).await.unwrap();
    assert!(a2.enroll.token.is_none() && !a2.minted);
    assert_eq!(a2.enroll.api_url.as_deref(), Some(API_URL));

    // A user assigns the prod image; the HTTP server now renders that image's script.
    machine_api
        .patch(
            "mac-525400dead01",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"image": "prod"}})),
        )
        .await
        .unwrap();
    let r = get(addr, "/boot/52-54-00-de-ad-01.ipxe").await.unwrap();
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
    assert_eq!(boot_tokens(&client).await.len(), 3);

    // A machine that names a missing image gets a clear refusal, and no token.
    machine_api
        .patch(
            "mac-525400dead01",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"image": "nope"}})),
        )
        .await
        .unwrap();
    let err = a.assignment(mac, true).await.unwrap_err();
    assert!(err.to_string().contains("\"nope\""), "{err}");
    let r = get(addr, "/boot/52-54-00-de-ad-01.ipxe").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        boot_tokens(&client).await.len(),
        3,
        "no token for a refused script"
    );
    // A BootImage whose values would inject into the script is refused at render time,
    // before any token is recorded.
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
    machine_api
        .patch(
            "mac-525400dead01",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"image": "evil"}})),
        )
        .await
        .unwrap();
    let r = get(addr, "/boot/52-54-00-de-ad-01.ipxe").await.unwrap();
    assert_eq!(r.status, 503);
    assert!(
        !r.text().contains("net0"),
        "nothing of the bad value is echoed"
    );
    assert_eq!(
        boot_tokens(&client).await.len(),
        3,
        "no token for a refused script"
    );
    assert_eq!(machines(&client).await, 1);

    // An unusable ConfigMap is refused with the key at fault.
    cm.data = Some(BTreeMap::from([
        (KEY_URL.to_string(), "ftp://nope".to_string()),
        (KEY_CA_PIN.to_string(), pin().to_string()),
    ]));
    cms.replace(CONFIG_MAP, &PostParams::default(), &{
        let mut c = cm.clone();
        c.metadata.resource_version = cms.get(CONFIG_MAP).await.unwrap().metadata.resource_version;
        c
    })
    .await
    .unwrap();
    let err = a.assignment(mac, true).await.unwrap_err().to_string();
    assert!(err.contains("key url") && err.contains("http://"), "{err}");
    // Flags stand in for the ConfigMap.
    cms.delete(CONFIG_MAP, &DeleteParams::default())
        .await
        .unwrap();
    let flagged = KubeSource::new(
        client.clone(),
        KubeOptions {
            api_url: Some("https://flag.example:9443".into()),
            ca_pin: Some(pin()),
            ..options("10.99.0.1")
        },
    )
    .unwrap();
    let fa = flagged
        .assignment("52:54:00:de:ad:03".parse().unwrap(), true)
        .await
        .unwrap();
    assert_eq!(
        fa.enroll.api_url.as_deref(),
        Some("https://flag.example:9443")
    );
    assert!(KubeSource::new(client.clone(), options("not a label")).is_err());
    let m = metrics.render();
    assert!(m.contains("route=\"script\",status=\"200\""), "{m}");

    // Expired tokens of this server are deleted; others' and live ones stay.
    let now = OffsetDateTime::now_utc();
    let old = now - time::Duration::hours(1);
    let mut made = Vec::new();
    for (src, minted) in [(&a, old), (&a, now), (&b, old)] {
        let t = Token::generate().unwrap();
        let secret = src.token_secret(&t, mac, minted);
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        made.push(t);
    }
    let join = Token::generate().unwrap();
    let mut js = TokenRecord::join(
        &join,
        old,
        time::Duration::minutes(1),
        None,
        None,
        BTreeMap::new(),
    )
    .to_secret(NAMESPACE);
    js.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(SERVER_LABEL.into(), "10.99.0.1".into());
    secrets.create(&PostParams::default(), &js).await.unwrap();
    let before = boot_tokens(&client).await.len();
    assert_eq!(a.collect_expired(now).await.unwrap(), 1);
    let left: Vec<String> = boot_tokens(&client)
        .await
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(left.len(), before - 1);
    let name = |t: &Token| tether_api::token::secret_name(t.id());
    assert!(!left.contains(&name(&made[0])), "ours, expired: deleted");
    assert!(left.contains(&name(&made[1])), "ours, live: kept");
    assert!(left.contains(&name(&made[2])), "another server's: kept");
    assert!(
        secrets.get_opt(&name(&join)).await.unwrap().is_some(),
        "join tokens: kept"
    );
    assert_eq!(a.collect_expired(now).await.unwrap(), 0, "idempotent");
    let _ = stop.send(true);
}
