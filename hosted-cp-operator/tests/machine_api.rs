//! The machine API against a real kube-apiserver + etcd, with the real agent library on the
//! other side (each "node" is a directory tree standing in for `/proc` and `/sys`, plus its
//! own state directory). Every refusal asserts its reason and that nothing was created or
//! spent.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_agent::api::MachineApi;
use tether_agent::identity::{Identity, StateDir};
use tether_api::machine::AGENT_REACHABLE;
use tether_api::machine_api::{CONFIG_MAP, KEY_CA_PIN, KEY_URL, NAMESPACE, Reason, StatusReport};
use tether_api::token::{self, TokenRecord};
use tether_api::{Machine, MachinePhase};
use tether_boot::seed::Seed;
use tether_boot::{CaPin, Mac, Token};
use tether_operator::machine_api::{self, Running, Settings, tokens::Tokens};
use tether_testkit::TestCluster;
use tokio::sync::watch;

struct Env {
    _cluster: TestCluster,
    client: kube::Client,
    running: Running,
    _stop: watch::Sender<bool>,
    nodes: tempfile::TempDir,
}

async fn env(tweak: impl FnOnce(&mut Settings)) -> Env {
    let cluster = TestCluster::start()
        .await
        .expect("start kube-apiserver + etcd");
    let client = cluster.client();
    tether_operator::crds::install(&client).await.unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap(),
    )
    .await
    .unwrap();
    let port = tether_testkit::ports::free_port();
    let mut settings = Settings::new(
        ([127, 0, 0, 1], port).into(),
        format!("https://127.0.0.1:{port}"),
    );
    tweak(&mut settings);
    let (stop, rx) = watch::channel(false);
    let running = machine_api::start(client.clone(), NAMESPACE, settings, rx)
        .await
        .expect("start the machine API");
    Env {
        _cluster: cluster,
        client,
        running,
        _stop: stop,
        nodes: tempfile::tempdir().unwrap(),
    }
}

impl Env {
    /// A node's tree: `/proc/cmdline` naming its boot MAC.
    fn node(&self, mac: &str) -> (std::path::PathBuf, StateDir) {
        let root = self.nodes.path().join(mac.replace(':', ""));
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("proc/cmdline"),
            format!("console=ttyS0 tether.mac={mac}\n"),
        )
        .unwrap();
        let state = StateDir::new(root.join("state"));
        (root, state)
    }

    fn seed(&self, token: &Token) -> Seed {
        Seed::new(&self.running.url, self.running.pin, token.clone()).unwrap()
    }

    async fn join_token(&self, uses: Option<u32>) -> Token {
        Tokens::new(self.client.clone(), NAMESPACE)
            .create_join(time::Duration::hours(1), uses, None, BTreeMap::new())
            .await
            .unwrap()
    }

    async fn put_record(&self, record: &TokenRecord) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NAMESPACE);
        secrets
            .create(&PostParams::default(), &record.to_secret(NAMESPACE))
            .await
            .unwrap();
    }

    async fn boot_token(&self, mac: &str) -> Token {
        let t = Token::generate().unwrap();
        let m: Mac = mac.parse().unwrap();
        self.put_record(&TokenRecord::boot(
            &t,
            m,
            time::OffsetDateTime::now_utc(),
            time::Duration::minutes(15),
        ))
        .await;
        t
    }

    async fn record(&self, id: &str) -> TokenRecord {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NAMESPACE);
        TokenRecord::from_secret(&secrets.get(&token::secret_name(id)).await.unwrap()).unwrap()
    }

    async fn machines(&self) -> Vec<Machine> {
        let api: Api<Machine> = Api::all(self.client.clone());
        api.list(&ListParams::default()).await.unwrap().items
    }

    async fn machine(&self, name: &str) -> Machine {
        let api: Api<Machine> = Api::all(self.client.clone());
        api.get(name).await.unwrap()
    }

    async fn enroll(
        &self,
        root: &Path,
        state: &StateDir,
        seed: Seed,
    ) -> Result<Identity, tether_agent::Error> {
        tether_agent::enroll::enroll(root, state, Some(seed), &Default::default()).await
    }

    /// A raw POST to /v1/enroll over pinned TLS (for bodies the agent would never send).
    async fn raw_enroll(&self, body: Vec<u8>) -> (u16, serde_json::Value) {
        let verifier = tether_agent::tls::PinnedVerifier::new(self.running.pin);
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tether_agent::tls::pinned(verifier).unwrap())
            .build()
            .unwrap();
        let r = client
            .post(format!("{}/v1/enroll", self.running.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}

fn reason_of(e: &tether_agent::Error) -> Option<Reason> {
    match e {
        tether_agent::Error::Refused { error, .. } => Some(error.reason),
        _ => None,
    }
}

fn report() -> StatusReport {
    StatusReport {
        phase: Some(MachinePhase::Enrolled),
        agent_version: "test".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_long_poll_status_renewal_and_revocation() {
    let env = env(|_| {}).await;

    // Published where tether-pxe and `token create --user-data` read it.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), NAMESPACE);
    let cm = cms.get(CONFIG_MAP).await.unwrap().data.unwrap();
    assert_eq!(cm[KEY_URL], env.running.url);
    assert_eq!(cm[KEY_CA_PIN].parse::<CaPin>().unwrap(), env.running.pin);

    let token = env.join_token(Some(3)).await;
    let (root_a, state_a) = env.node("52:54:00:00:0a:01");
    let started = Instant::now();
    let a = env
        .enroll(&root_a, &state_a, env.seed(&token))
        .await
        .expect("node A enrolls");
    eprintln!("enrollment took {:?}", started.elapsed());
    assert_eq!(a.enrolled.machine, "mac-525400000a01");
    let m = env.machine("mac-525400000a01").await;
    let st = m.status.clone().unwrap();
    assert_eq!(st.phase, MachinePhase::Enrolled);
    assert_eq!(
        st.facts.unwrap().boot_mac.as_deref(),
        Some("52:54:00:00:0a:01")
    );
    assert_eq!(st.certificate.as_ref().unwrap().pem, a.enrolled.certificate);
    assert_eq!(
        m.metadata.labels.unwrap()[tether_api::machine::MAC_LABEL],
        "52-54-00-00-0a-01"
    );
    assert_eq!(env.record(token.id()).await.uses_left, Some(2));

    // Killed after the token was spent, before the certificate was saved: the retry with
    // the same key gets the same certificate, and the token is not spent twice.
    state_a.forget_enrollment().unwrap();
    let again = env
        .enroll(&root_a, &state_a, env.seed(&token))
        .await
        .expect("replay");
    assert_eq!(again.enrolled.certificate, a.enrolled.certificate);
    assert_eq!(
        env.record(token.id()).await.uses_left,
        Some(2),
        "a replay spends nothing"
    );
    assert_eq!(env.machines().await.len(), 1);

    // Two requests with one key racing (a retry after a timeout while the first still runs)
    // end with one certificate, the one on record, whichever answer the node keeps.
    let (root_c, state_c) = env.node("52:54:00:00:0a:02");
    state_c.key().unwrap();
    let (x, y) = tokio::join!(
        env.enroll(&root_c, &state_c, env.seed(&token)),
        env.enroll(&root_c, &state_c, env.seed(&token))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.enrolled.certificate, y.enrolled.certificate);
    let on_record = env
        .machine(&x.enrolled.machine)
        .await
        .status
        .unwrap()
        .certificate
        .unwrap();
    assert_eq!(on_record.pem, x.enrolled.certificate);
    assert_eq!(
        env.record(token.id()).await.uses_left,
        Some(1),
        "spent once for the key"
    );

    // Long-poll: answers at once without a version, then waits until the config changes —
    // a spec change and a status change alike (the phase is part of the config). The
    // change is made only once the poll has waited 2 s, so an answer before that would be
    // wrong, and one long after it means the change did not wake it.
    let api_a = MachineApi::mutual(&a.enrolled.api, &a).unwrap();
    let machines: Api<Machine> = Api::all(env.client.clone());
    let cfg = api_a
        .config("mac-525400000a01", None, Duration::from_secs(5))
        .await
        .unwrap();
    let changes: [(&str, serde_json::Value); 2] = [
        ("spec", json!({"spec": {"image": "tether-0-2-0"}})),
        ("status", json!({"status": {"phase": "Assigned"}})),
    ];
    let mut known = cfg.version.clone();
    for (what, change) in changes {
        let poll = {
            let api_a = api_a.clone();
            let known = known.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let c = api_a
                    .config("mac-525400000a01", Some(&known), Duration::from_secs(30))
                    .await;
                (c, t.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !poll.is_finished(),
            "the {what} long-poll answered before anything changed"
        );
        let pp = PatchParams::default();
        if what == "spec" {
            machines
                .patch("mac-525400000a01", &pp, &Patch::Merge(change))
                .await
                .unwrap();
        } else {
            machines
                .patch_status("mac-525400000a01", &pp, &Patch::Merge(change))
                .await
                .unwrap();
        }
        let (cfg, took) = poll.await.unwrap();
        let cfg = cfg.unwrap();
        eprintln!("{what} long-poll answered {took:?} after it started (change made at 2 s)");
        assert_ne!(cfg.version, known);
        assert!(
            took < Duration::from_secs(10),
            "the {what} change woke the long-poll: {took:?}"
        );
        known = cfg.version.clone();
        if what == "spec" {
            assert_eq!(cfg.image.as_deref(), Some("tether-0-2-0"));
        } else {
            assert_eq!(cfg.phase, MachinePhase::Assigned);
        }
    }
    machines
        .patch_status(
            "mac-525400000a01",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Enrolled"}})),
        )
        .await
        .unwrap();

    // Status: lastSeen, agent version, AgentReachable.
    api_a.status("mac-525400000a01", &report()).await.unwrap();
    let st = env.machine("mac-525400000a01").await.status.unwrap();
    assert!(st.last_seen.is_some());
    assert_eq!(st.agent_version.as_deref(), Some("test"));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == AGENT_REACHABLE && c.status == "True")
    );

    // Renewal: a new key, a new certificate; the old one works until the new one is used.
    let next = state_a.next_key().unwrap();
    let resp = api_a
        .renew(
            "mac-525400000a01",
            tether_agent::identity::csr(&next).unwrap(),
        )
        .await
        .unwrap();
    assert_ne!(resp.certificate, a.enrolled.certificate);
    let repeat = api_a
        .renew(
            "mac-525400000a01",
            tether_agent::identity::csr(&next).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        repeat.certificate, resp.certificate,
        "the same key gets the same certificate"
    );
    let renewed = state_a
        .save(
            &tether_agent::identity::Enrolled {
                api: a.enrolled.api.clone(),
                machine: resp.machine.clone(),
                certificate: resp.certificate.clone(),
                ca: resp.ca.clone(),
                received: 0,
            },
            &next,
        )
        .unwrap();
    api_a
        .config("mac-525400000a01", None, Duration::from_secs(1))
        .await
        .expect("the old certificate still works");
    let api_a2 = MachineApi::mutual(&renewed.enrolled.api, &renewed).unwrap();
    api_a2
        .status("mac-525400000a01", &report())
        .await
        .expect("the new certificate works");
    let err = api_a
        .config("mac-525400000a01", None, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(
        reason_of(&err),
        Some(Reason::Forbidden),
        "replaced once the new one was used: {err}"
    );

    // Node B; A's certificate cannot reach B's endpoints.
    let (root_b, state_b) = env.node("52:54:00:00:0b:01");
    let b = env
        .enroll(&root_b, &state_b, env.seed(&token))
        .await
        .expect("node B enrolls");
    let err = api_a2
        .config(&b.enrolled.machine, None, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::Forbidden), "{err}");
    let err = api_a2
        .status(&b.enrolled.machine, &report())
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::Forbidden), "{err}");

    // Deleting B revokes its certificate.
    let api_b = MachineApi::mutual(&b.enrolled.api, &b).unwrap();
    api_b.status(&b.enrolled.machine, &report()).await.unwrap();
    machines
        .delete(&b.enrolled.machine, &DeleteParams::default())
        .await
        .unwrap();
    let err = api_b
        .status(&b.enrolled.machine, &report())
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::Forbidden), "{err}");
    assert!(err.to_string().contains("no longer exists"), "{err}");

    // Without a certificate: 401.
    let pinned = MachineApi::pinned(&env.running.url, env.running.pin).unwrap();
    let err = pinned
        .config("mac-525400000a01", None, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::CertificateRequired), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_say_why_and_change_nothing() {
    let env = env(|_| {}).await;
    let now = time::OffsetDateTime::now_utc();

    let unchanged = |before: &TokenRecord, after: &TokenRecord| {
        assert_eq!(before.uses_left, after.uses_left);
        assert_eq!(before.spent, after.spent);
    };

    // Expired.
    let expired = Token::generate().unwrap();
    env.put_record(&TokenRecord::join(
        &expired,
        now - time::Duration::hours(2),
        time::Duration::hours(1),
        None,
        None,
        BTreeMap::new(),
    ))
    .await;
    let (root, state) = env.node("52:54:00:00:0c:01");
    let before = env.record(expired.id()).await;
    let err = env
        .enroll(&root, &state, env.seed(&expired))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::TokenExpired), "{err}");
    unchanged(&before, &env.record(expired.id()).await);

    // A boot token from another MAC.
    let boot = env.boot_token("52:54:00:00:0d:01").await;
    let (root_other, state_other) = env.node("52:54:00:00:0d:99");
    let err = env
        .enroll(&root_other, &state_other, env.seed(&boot))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::TokenWrongMac), "{err}");
    assert!(err.to_string().contains("52:54:00:00:0d:01"), "{err}");

    // Unknown, and a known id with the wrong secret.
    let unknown = Token::generate().unwrap();
    let err = env
        .enroll(&root, &state, env.seed(&unknown))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::TokenInvalid), "{err}");
    let forged: Token = format!("{}.0000000000000000", boot.id()).parse().unwrap();
    let err = env
        .enroll(&root_other, &state_other, env.seed(&forged))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::TokenInvalid), "{err}");

    // Wrong pin: refused before anything is sent, so the token is not spent.
    let (root_d, state_d) = env.node("52:54:00:00:0d:01");
    let before = env.record(boot.id()).await;
    let wrong_pin = Seed::new(
        &env.running.url,
        CaPin::of_spki(b"someone else"),
        boot.clone(),
    )
    .unwrap();
    let err = env.enroll(&root_d, &state_d, wrong_pin).await.unwrap_err();
    assert!(
        matches!(err, tether_agent::Error::Untrusted { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("matches the pin"), "{err}");
    unchanged(&before, &env.record(boot.id()).await);
    assert!(
        env.machines().await.is_empty(),
        "no refusal created a Machine"
    );

    // Single use: the right machine enrolls once; a second key is refused.
    env.enroll(&root_d, &state_d, env.seed(&boot))
        .await
        .expect("the bound machine enrolls");
    let (root_d2, state_d2) = env.node("52:54:00:00:0d:01");
    std::fs::remove_dir_all(state_d2.path()).ok();
    let other_key = StateDir::new(root_d2.join("state-2"));
    let err = env
        .enroll(&root_d2, &other_key, env.seed(&boot))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::TokenUsedUp), "{err}");
    assert_eq!(env.machines().await.len(), 1);

    // Nobody takes over an enrolled Machine by claiming its MAC with a token not meant for
    // it (the victim keeps its certificate and the token is not spent), and a token of
    // another pool cannot take a pooled Machine either.
    let victim_token = env.join_token(None).await;
    let (root_v, state_v) = env.node("52:54:00:00:0c:02");
    let victim = env
        .enroll(&root_v, &state_v, env.seed(&victim_token))
        .await
        .expect("the victim enrolls");
    let record_before = env
        .machine(&victim.enrolled.machine)
        .await
        .status
        .unwrap()
        .certificate;
    let thief_token = env.join_token(Some(5)).await;
    let (_, thief_state) = env.node("52:54:00:00:0c:03");
    let err = env
        .enroll(&root_v, &thief_state, env.seed(&thief_token))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::MachineClaimed), "{err}");
    assert_eq!(
        env.machine(&victim.enrolled.machine)
            .await
            .status
            .unwrap()
            .certificate,
        record_before
    );
    assert_eq!(
        env.record(thief_token.id()).await.uses_left,
        Some(5),
        "nothing spent"
    );
    let pooled = Tokens::new(env.client.clone(), NAMESPACE)
        .create_join(
            time::Duration::hours(1),
            None,
            Some("team-a/x".into()),
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let (root_p, state_p) = env.node("52:54:00:00:0c:04");
    let member = env
        .enroll(&root_p, &state_p, env.seed(&pooled))
        .await
        .unwrap();
    let other_pool = Tokens::new(env.client.clone(), NAMESPACE)
        .create_join(
            time::Duration::hours(1),
            None,
            Some("team-b/y".into()),
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let (_, other_state) = env.node("52:54:00:00:0c:05");
    let err = env
        .enroll(&root_p, &other_state, env.seed(&other_pool))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::MachineClaimed), "{err}");
    assert!(err.to_string().contains("team-a/x"), "{err}");
    // Its own pool's token may (a stateless node of that pool coming back).
    let (_, again_state) = env.node("52:54:00:00:0c:06");
    let back = env
        .enroll(&root_p, &again_state, env.seed(&pooled))
        .await
        .expect("its pool's token rebinds");
    assert_eq!(back.enrolled.machine, member.enrolled.machine);

    // Deleting a Machine revokes it: a replay with the old key and token comes to nothing,
    // and the Machine is not brought back.
    let once = env.join_token(Some(1)).await;
    let (root_r, state_r) = env.node("52:54:00:00:0c:07");
    let gone = env
        .enroll(&root_r, &state_r, env.seed(&once))
        .await
        .unwrap();
    Api::<Machine>::all(env.client.clone())
        .delete(&gone.enrolled.machine, &DeleteParams::default())
        .await
        .unwrap();
    state_r.forget_enrollment().unwrap();
    let err = env
        .enroll(&root_r, &state_r, env.seed(&once))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::TokenUsedUp), "{err}");
    assert!(err.to_string().contains("deleted"), "{err}");
    assert!(
        Api::<Machine>::all(env.client.clone())
            .get_opt(&gone.enrolled.machine)
            .await
            .unwrap()
            .is_none(),
        "the deleted Machine stays deleted"
    );

    // Garbage bodies.
    let count = env.machines().await.len();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"not json".to_vec(), 400, "BadRequest"),
        (
            br#"{"token":"a","csr":"b","facts":{},"admin":true}"#.to_vec(),
            400,
            "BadRequest",
        ),
        (vec![b' '; 100_000], 413, "PayloadTooLarge"),
        (
            br#"{"token":"nope","csr":"b","facts":{}}"#.to_vec(),
            403,
            "TokenMalformed",
        ),
        (
            format!(
                r#"{{"token":"{boot}","csr":"garbage","facts":{{"bootMac":"52:54:00:00:0d:01"}}}}"#
            )
            .into_bytes(),
            400,
            "BadRequest",
        ),
    ];
    for (body, status, reason) in cases {
        let (got, json) = env.raw_enroll(body).await;
        assert_eq!(got, status, "{json}");
        assert_eq!(json["reason"], reason, "{json}");
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{json}"
        );
    }
    assert_eq!(env.machines().await.len(), count, "garbage created nothing");

    // Each refusal left a Warning Event.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reasons: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter_map(|e| e.reason)
            .collect();
        let want = [
            "MachineClaimed",
            "TokenExpired",
            "TokenWrongMac",
            "TokenInvalid",
            "TokenUsedUp",
            "TokenMalformed",
        ];
        if want.iter().all(|w| reasons.iter().any(|r| r == w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing Warning Events; have {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_is_rate_limited_and_silence_is_noticed() {
    let env = env(|s| {
        s.enroll_rate = 0.001;
        s.enroll_burst = 3;
        s.report_seconds = 1;
    })
    .await;
    tokio::spawn(tether_operator::machines::reachability::run(
        env.client.clone(),
        1,
    ));
    let token = env.join_token(None).await;
    let (root, state) = env.node("52:54:00:00:0e:01");
    env.enroll(&root, &state, env.seed(&token))
        .await
        .expect("within the burst");
    for _ in 0..2 {
        let (status, _) = env.raw_enroll(b"{}".to_vec()).await;
        assert_eq!(status, 400);
    }
    let (status, json) = env.raw_enroll(b"{}".to_vec()).await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (429, Some("RateLimited")),
        "{json}"
    );

    // No reports: AgentReachable turns False after three missed intervals.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = env.machine("mac-525400000e01").await.status.unwrap();
        if let Some(c) = st
            .conditions
            .iter()
            .find(|c| c.type_ == AGENT_REACHABLE && c.status == "False")
        {
            assert_eq!(c.reason, "NoRecentReport");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "AgentReachable never went False: {:?}",
            st.conditions
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The agent's service renews its certificate by itself at two thirds of its life (here
/// 30 s), the API accepts only the new one once it is used, and a restarted service reuses
/// the saved identity instead of enrolling again.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_renews_by_itself_and_a_restart_reuses_its_identity() {
    let env = env(|s| {
        s.cert_lifetime = time::Duration::seconds(30);
        s.report_seconds = 1;
    })
    .await;
    let token = env.join_token(Some(1)).await;
    let (root, state) = env.node("52:54:00:00:1a:01");
    let first = env.enroll(&root, &state, env.seed(&token)).await.unwrap();
    let service = |state: StateDir| {
        let root = root.clone();
        tokio::spawn(async move {
            tether_agent::service::Service {
                root,
                state,
                notify: Default::default(),
            }
            .run()
            .await
        })
    };
    let running = service(state.clone());
    let started = Instant::now();
    let name = first.enrolled.machine.clone();
    // Renewed: the record holds a new certificate, the node saved it, and once the node
    // reported with it the old one is no longer on record.
    let renewed = loop {
        let cert = env
            .machine(&name)
            .await
            .status
            .unwrap()
            .certificate
            .unwrap();
        let saved = state.load().unwrap().unwrap();
        if cert.pem != first.enrolled.certificate
            && saved.enrolled.certificate == cert.pem
            && cert.previous_sha256.is_none()
        {
            break saved;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no renewal after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("renewed {:?} after the service started", started.elapsed());
    assert!(
        started.elapsed() >= Duration::from_secs(15),
        "not before two thirds of 30 s"
    );
    let old = MachineApi::mutual(&first.enrolled.api, &first).unwrap();
    let err = old
        .config(&name, None, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err), Some(Reason::Forbidden), "{err}");

    // A restart finds the identity and enrolls nothing (the single-use token is spent).
    running.abort();
    let _ = running.await;
    let seen = env.machine(&name).await.status.unwrap().last_seen;
    let again = service(state.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = env.machine(&name).await.status.unwrap();
        if st.last_seen != seen {
            assert_eq!(st.certificate.unwrap().pem, renewed.enrolled.certificate);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted service never reported"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    again.abort();
    assert_eq!(
        env.record(token.id()).await.spent.len(),
        1,
        "no second enrollment"
    );
    assert_eq!(env.machines().await.len(), 1);
}
