//! The `kubernetes` runtime: a tenant's components as one Deployment (a container per
//! component, rolling update with maxUnavailable 0) plus a Service, in the management
//! cluster. [`manifests`] is pure; the Secrets it mounts are the ones the controller
//! applies for every runtime, each mounted at the directory the rendered arguments use,
//! so the containers run exactly the arguments the process runtime runs.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tether_api::TenantControlPlaneSpec;

use crate::controlplane::component::{ComponentSpec, EnvValue, Program};

/// Applies and deletes tenants' Deployments and Services in the management cluster.
#[derive(Clone)]
pub struct KubernetesRuntime {
    /// Management cluster client.
    pub client: kube::Client,
    /// Image overrides by component name.
    pub images: BTreeMap<String, String>,
}

impl KubernetesRuntime {
    /// Server-side applies the tenant's Deployment and Service (owned by the tenant, so a
    /// management cluster's garbage collector removes them with it too).
    pub async fn apply(
        &self,
        ns: &str,
        name: &str,
        spec: &TenantControlPlaneSpec,
        components: &[ComponentSpec],
        owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    ) -> Result<(), crate::error::Error> {
        let (mut deployment, mut service) = manifests(name, ns, spec, components, &self.images);
        // Force-applying by name would take over whatever has that name: refuse anything
        // the tenant does not own (a tenant named `kubernetes` in `default` must never
        // replace the management cluster's own Service).
        if let Some(o) = &owner {
            for obj in [&deployment, &service] {
                if let Some(what) = self.foreign(obj, &o.uid).await? {
                    return Err(crate::error::Error::Conflict(format!(
                        "{what} already exists and does not belong to this TenantControlPlane; \
                         rename the tenant or remove that object"
                    )));
                }
            }
        }
        if let Some(o) = owner {
            let o = serde_json::to_value(o).map_err(|source| crate::error::Error::Json {
                what: "owner reference".into(),
                source,
            })?;
            deployment["metadata"]["ownerReferences"] = json!([o.clone()]);
            service["metadata"]["ownerReferences"] = json!([o]);
        }
        crate::kube::apply_objects(&self.client, &[deployment, service]).await
    }

    /// `Some("<Kind> ns/name")` when `obj`'s namesake exists and is not owned by `uid`.
    async fn foreign(&self, obj: &Value, uid: &str) -> Result<Option<String>, crate::error::Error> {
        let (api, n) = crate::kube::dynamic_api(&self.client, obj)?;
        let what = format!(
            "{} {}/{n}",
            obj["kind"].as_str().unwrap_or_default(),
            obj["metadata"]["namespace"].as_str().unwrap_or_default()
        );
        let existing = api
            .get_opt(&n)
            .await
            .map_err(crate::error::Error::kube(format!("get {what}")))?;
        Ok(existing
            .filter(|e| !owned_by(&e.metadata, uid))
            .map(|_| what))
    }

    /// Deletes the tenant's Deployment and Service (absent is fine). With `owner_uid`, an
    /// object of that name that the tenant does not own is left alone.
    pub async fn delete(
        &self,
        ns: &str,
        name: &str,
        owner_uid: Option<&str>,
    ) -> Result<(), crate::error::Error> {
        for (api_version, kind) in [("apps/v1", "Deployment"), ("v1", "Service")] {
            let obj = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": ns}});
            if let Some(uid) = owner_uid
                && let Some(what) = self.foreign(&obj, uid).await?
            {
                tracing::warn!("{what} does not belong to the tenant; not deleting it");
                continue;
            }
            let (api, n) = crate::kube::dynamic_api(&self.client, &obj)?;
            match api.delete(&n, &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(crate::error::Error::kube(format!("delete {kind} {n}"))(e)),
            }
        }
        Ok(())
    }
}

/// Whether `meta` lists an owner with `uid`.
pub fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|r| r.uid == uid)
}

/// Where the files live inside the containers (their working directory).
pub const WORKDIR: &str = "/etc/tether";

/// The Deployment and the Service for tenant `name` in `namespace`. `images` overrides
/// the default image per component name.
pub fn manifests(
    name: &str,
    namespace: &str,
    spec: &TenantControlPlaneSpec,
    components: &[ComponentSpec],
    images: &BTreeMap<String, String>,
) -> (Value, Value) {
    let labels = json!({"tether.dev/tenant": name, "app.kubernetes.io/component": "control-plane"});
    // One Secret volume per directory, projecting exactly the keys the components read.
    let mut dirs: BTreeMap<String, (String, BTreeMap<String, String>)> = BTreeMap::new();
    for c in components {
        for f in &c.files {
            let (dir, file) = f.path.split_once('/').unwrap_or(("", &f.path));
            dirs.entry(dir.to_string())
                .or_insert_with(|| (f.secret.clone(), BTreeMap::new()))
                .1
                .insert(f.key.clone(), file.to_string());
        }
    }
    let mut volumes: Vec<Value> = dirs
        .iter()
        .map(|(dir, (secret, items))| {
            json!({"name": dir, "secret": {
                "secretName": secret,
                "defaultMode": 0o400,
                "items": items.iter().map(|(k, p)| json!({"key": k, "path": p})).collect::<Vec<_>>(),
            }})
        })
        .collect();
    volumes.push(json!({"name": "konnectivity", "emptyDir": {}}));

    let containers: Vec<Value> = components
        .iter()
        .map(|c| {
            let name = c.program.name();
            let mut mounts: Vec<Value> = c
                .files
                .iter()
                .filter_map(|f| f.path.split_once('/').map(|(d, _)| d.to_string()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|d| json!({"name": d, "mountPath": format!("{WORKDIR}/{d}"), "readOnly": true}))
                .collect();
            if matches!(
                c.program,
                Program::KubeApiserver | Program::KonnectivityServer
            ) {
                mounts.push(json!({"name": "konnectivity", "mountPath": format!("{WORKDIR}/konnectivity")}));
            }
            let env: Vec<Value> = c
                .env
                .iter()
                .map(|(k, v)| match v {
                    EnvValue::Literal(s) => json!({"name": k, "value": s}),
                    EnvValue::Secret { secret, key } => {
                        json!({"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
                    }
                })
                .collect();
            let probe_port = c
                .ports
                .iter()
                .find(|(n, _)| *n == c.probe.port)
                .map(|(_, p)| *p)
                .unwrap_or(0);
            let probe = if c.probe.scheme == "tcp" {
                json!({"tcpSocket": {"port": probe_port}, "periodSeconds": 5})
            } else {
                json!({"httpGet": {"path": c.probe.path, "port": probe_port, "scheme": c.probe.scheme.to_uppercase()}, "periodSeconds": 5})
            };
            let resources = spec
                .control_plane
                .resources
                .get(name)
                .map(|r| json!({"requests": r.requests, "limits": r.limits}))
                .unwrap_or_else(|| json!({}));
            json!({
                "name": name,
                "image": images.get(name).cloned().unwrap_or_else(|| c.program.image(&c.version)),
                "command": [c.program.image_command()],
                "args": c.args,
                "workingDir": WORKDIR,
                "env": env,
                "ports": c.ports.iter().map(|(n, p)| json!({"name": n, "containerPort": p})).collect::<Vec<_>>(),
                "volumeMounts": mounts,
                "readinessProbe": probe,
                "livenessProbe": probe,
                "resources": resources,
            })
        })
        .collect();

    let api_port = components
        .iter()
        .flat_map(|c| c.ports.iter())
        .find(|(n, _)| *n == "api")
        .map(|(_, p)| *p)
        .unwrap_or(6443);
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": spec.control_plane.replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": containers, "volumes": volumes},
            },
        },
    });
    let svc = &spec.control_plane.service;
    let mut ports =
        vec![json!({"name": "api", "port": svc.port, "targetPort": api_port, "protocol": "TCP"})];
    if let Some(k) = &spec.addons.konnectivity {
        ports.push(json!({"name": "konnectivity", "port": k.port, "targetPort": k.port, "protocol": "TCP"}));
    }
    if let Some(np) = svc.node_port {
        ports[0]["nodePort"] = json!(np);
    }
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"type": svc.type_.to_string(), "selector": labels, "ports": ports},
    });
    if let (tether_api::tenant_control_plane::ServiceType::LoadBalancer, Some(addr)) =
        (svc.type_, &svc.address)
    {
        service["spec"]["loadBalancerIP"] = json!(addr);
    }
    (deployment, service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::render::{Ports, RenderInputs, Secrets, Storage, render};
    use tether_api::tenant_control_plane::KubernetesSpec;

    #[test]
    fn deployment_runs_the_rendered_args_with_every_file_mounted() {
        let spec = TenantControlPlaneSpec {
            kubernetes: KubernetesSpec {
                version: "v1.36.3".into(),
            },
            ..Default::default()
        };
        let comps = render(&RenderInputs {
            spec: &spec,
            version: "v1.36.3",
            storage: Storage::Etcd {
                servers: vec!["https://etcd:2379".into()],
                prefix: "/tether/ns/t".into(),
            },
            ports: Ports::in_pod(&spec),
            bind_address: "0.0.0.0".into(),
            advertise_address: "127.0.0.1".into(),
            secrets: Secrets::for_tenant("t"),
            replicas: 2,
        });
        let (d, s) = manifests("t", "ns", &spec, &comps, &BTreeMap::new());
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), comps.len());
        for (c, spec) in containers.iter().zip(&comps) {
            assert_eq!(c["args"], json!(spec.args));
            assert_eq!(c["image"], json!(spec.program.image("v1.36.3")));
        }
        let konnectivity = containers
            .iter()
            .find(|c| c["name"] == "konnectivity-server")
            .unwrap();
        assert_eq!(konnectivity["command"], json!(["/proxy-server"]));
        assert!(
            konnectivity["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--server-count=2")),
            "every agent holds a stream to each of the 2 instances"
        );
        let apiserver = containers
            .iter()
            .find(|c| c["name"] == "kube-apiserver")
            .unwrap();
        assert_eq!(apiserver["command"], json!(["kube-apiserver"]));
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        assert_eq!(s["spec"]["ports"][0]["port"], 6443);
        let vols = d["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        let pki = vols.iter().find(|v| v["name"] == "pki").unwrap();
        assert_eq!(pki["secret"]["secretName"], "t-pki");
    }
}
