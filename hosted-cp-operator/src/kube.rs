//! Talking to Kubernetes, the way every controller of the operator does it: server-side
//! apply under one field manager, status as a merge patch, standard conditions, Warning
//! Events for refusals, clients from in-memory kubeconfigs, and waiting for `/readyz`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::{Value, json};
use tether_api::Condition;
use time::OffsetDateTime;

use crate::error::Error;

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "tether-operator";

/// Secret data: key (file name) → contents.
pub type Files = BTreeMap<String, Vec<u8>>;

/// The data of Secret `name`; empty when it does not exist.
pub async fn read_secret(api: &Api<Secret>, name: &str) -> Result<Files, Error> {
    Ok(api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get Secret {name}")))?
        .and_then(|s| s.data)
        .map(|d| d.into_iter().map(|(k, v)| (k, v.0)).collect())
        .unwrap_or_default())
}

/// Server-side applies Secret `name` holding exactly `data`, with `labels` and `owner`.
pub async fn apply_secret(
    api: &Api<Secret>,
    name: &str,
    labels: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
    data: &Files,
) -> Result<(), Error> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            owner_references: Some(owner.into_iter().collect()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&secret).map_err(|source| Error::Json {
        what: "Secret".into(),
        source,
    })?;
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(value),
    )
    .await
    .map_err(Error::kube(format!("apply Secret {name}")))?;
    Ok(())
}

/// Deletes Secret `name` if it carries label `key=value` (what the operator made); absent
/// is fine, and a namesake someone else made is left alone.
pub async fn delete_labelled_secret(
    api: &Api<Secret>,
    name: &str,
    (key, value): (&str, &str),
) -> Result<(), Error> {
    let Some(secret) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get Secret {name}")))?
    else {
        return Ok(());
    };
    let ours = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .is_some_and(|v| v == value);
    if !ours {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete Secret {name}"))(e)),
    }
}

/// Server-side applies `objects` (JSON manifests of any kind) through `client`.
pub async fn apply_objects(client: &kube::Client, objects: &[Value]) -> Result<(), Error> {
    let pp = PatchParams::apply(MANAGER).force();
    for obj in objects {
        let (api, name) = dynamic_api(client, obj)?;
        api.patch(&name, &pp, &Patch::Apply(obj))
            .await
            .map_err(Error::kube(format!("apply {} {name}", obj["kind"])))?;
    }
    Ok(())
}

/// An `Api<DynamicObject>` for `obj`'s kind and namespace, and its name.
pub fn dynamic_api(
    client: &kube::Client,
    obj: &Value,
) -> Result<(Api<DynamicObject>, String), Error> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let name = obj["metadata"]["name"]
        .as_str()
        .ok_or_else(|| Error::Invalid(format!("{kind} without a name")))?
        .to_string();
    let api = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    Ok((api, name))
}

/// Writes `status` as a merge patch of object `name`'s status subresource.
pub async fn patch_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .map_err(Error::kube(format!("update status of {name}")))?;
    Ok(())
}

/// A condition of `type_`, `True` when `ok`, stamped now.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Some(now_rfc3339()),
        observed_generation: generation,
    }
}

/// Now, as RFC 3339 (Kubernetes' timestamp format).
pub fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// `t` as RFC 3339.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Merges `new` conditions into `old`, keeping the transition time of unchanged ones.
pub fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut out: Vec<Condition> = old.to_vec();
    for c in new {
        match out.iter_mut().find(|o| o.type_ == c.type_) {
            Some(o) if o.status == c.status => {
                let t = o.last_transition_time.clone();
                *o = c;
                o.last_transition_time = t;
            }
            Some(o) => *o = c,
            None => out.push(c),
        }
    }
    out
}

/// Publishes a Warning Event on `object` so `kubectl describe` says why; a failure to
/// publish is only logged (the condition carries the same message).
pub async fn warn(
    recorder: &Recorder,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    action: &str,
    reason: &str,
    message: &str,
) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, object).await {
        tracing::debug!("publish event: {e}");
    }
}

/// A kubeconfig for `server` that trusts `ca_pem` and authenticates as `user` with a client
/// certificate.
pub fn render_kubeconfig(
    cluster: &str,
    server: &str,
    ca_pem: &[u8],
    user: &str,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> String {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server,
            "certificate-authority-data": STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": STANDARD.encode(cert_pem),
            "client-key-data": STANDARD.encode(key_pem),
        }}],
        "contexts": [{"name": format!("{user}@{cluster}"), "context": {"cluster": cluster, "user": user}}],
        "current-context": format!("{user}@{cluster}"),
    });
    serde_yaml::to_string(&doc).expect("a JSON value always renders as YAML")
}

/// A kube client for a kubeconfig held in memory.
pub async fn client_from_kubeconfig(yaml: &str) -> Result<kube::Client, Error> {
    let kc = kube::config::Kubeconfig::from_yaml(yaml)
        .map_err(|e| Error::Invalid(format!("kubeconfig: {e}")))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Invalid(format!("kubeconfig: {e}")))?;
    // Fail fast while a tenant API server is still starting; no read timeout, which would
    // cut the controller's long-running watches.
    config.connect_timeout = Some(Duration::from_secs(2));
    kube::Client::try_from(config).map_err(Error::kube("build client"))
}

/// Polls `/readyz` until it answers `ok`. Each request is bounded by what is left of
/// `timeout` (the client has no read timeout, and a stopped-but-listening API server would
/// otherwise hold the reconcile forever).
pub async fn wait_readyz(client: &kube::Client, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .expect("static request");
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, client.request_text(req)).await {
            Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
            Ok(Ok(body)) => last = body,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Timeout(format!(
        "/readyz (last: {})",
        last.lines().last().unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_wait_is_bounded_by_a_silent_server() {
        // A server that completes the TLS handshake and then never answers (what a wedged
        // API server looks like): `openssl s_server` prints the request and says nothing.
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::x509::new_ca("silent", OffsetDateTime::now_utc()).unwrap();
        std::fs::write(dir.path().join("c.pem"), cert).unwrap();
        std::fs::write(dir.path().join("k.pem"), key).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-cert", "c.pem", "-key", "k.pem"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{token: x}}\n"
        );
        let client = client_from_kubeconfig(&kc).await.unwrap();
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            wait_readyz(&client, Duration::from_secs(2)),
        )
        .await;
        let _ = server.kill();
        let _ = server.wait();
        let r = r.expect("wait_readyz outlived its timeout");
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(6));
    }

    #[test]
    fn merged_conditions_keep_unchanged_transition_times() {
        let old = vec![Condition {
            last_transition_time: Some("then".into()),
            ..condition("A", true, "R", "", None)
        }];
        let same = merge_conditions(&old, vec![condition("A", true, "R2", "m", Some(2))]);
        assert_eq!(same[0].last_transition_time.as_deref(), Some("then"));
        assert_eq!(same[0].reason, "R2");
        let flipped = merge_conditions(&old, vec![condition("A", false, "R", "", None)]);
        assert_ne!(flipped[0].last_transition_time.as_deref(), Some("then"));
        let added = merge_conditions(&old, vec![condition("B", true, "R", "", None)]);
        assert_eq!(added.len(), 2);
    }
}
