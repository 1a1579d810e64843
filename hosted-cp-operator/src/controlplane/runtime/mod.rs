//! Runtimes run rendered components: [`process`] as supervised local processes,
//! [`kubernetes`] as Deployments and Services in the management cluster. [`Runtime`] is
//! what the controller holds: the operator is started with exactly one.

pub mod kubernetes;
pub mod process;
pub mod supervisor;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tether_api::TenantControlPlaneSpec;

use crate::controlplane::component::ComponentSpec;
use crate::controlplane::render::Ports;
use crate::error::Error;

/// The runtime the operator runs tenants with.
#[derive(Clone)]
pub enum Runtime {
    /// Local supervised processes (standalone, edge, laptops, tests).
    Process(Arc<process::ProcessRuntime>),
    /// Deployments + Services in the management cluster (production).
    Kubernetes(kubernetes::KubernetesRuntime),
}

/// Where a tenant listens and how it is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Component ports.
    pub ports: Ports,
    /// The API server's bind address.
    pub bind_address: String,
    /// `https://host:port` clients and nodes use.
    pub endpoint: String,
    /// `host:port` nodes' konnectivity agents dial, when it is known (see
    /// `TenantControlPlaneStatus::konnectivity_endpoint`).
    pub konnectivity_endpoint: Option<String>,
    /// The host part of the endpoint (for the serving certificate).
    pub host: String,
    /// The IP the API server advertises (`--advertise-address`).
    pub advertise_address: String,
    /// Instances of the control plane running at once (the process runtime runs one).
    pub replicas: u32,
    /// How long a reconcile waits for `/readyz` before requeueing.
    pub readyz_wait: Duration,
}

/// Where nodes' konnectivity agents dial: the agent port on the tenant's address, when the
/// tenant runs konnectivity — except behind a NodePort Service, whose port the cluster
/// assigns (not known here).
fn konnectivity_endpoint(
    spec: &TenantControlPlaneSpec,
    host: &str,
    agent_port: u16,
    node_port_service: bool,
) -> Option<String> {
    (spec.addons.konnectivity.is_some() && !node_port_service)
        .then(|| format!("{host}:{agent_port}"))
}

/// `--advertise-address` must be an IP; a DNS name or a wildcard advertises loopback.
pub fn advertise_ip(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => ip.to_string(),
        _ => "127.0.0.1".into(),
    }
}

impl Runtime {
    /// The `kubernetes` runtime on `client`, with the default images.
    pub fn kubernetes(client: kube::Client) -> Runtime {
        Runtime::Kubernetes(kubernetes::KubernetesRuntime {
            client,
            images: Default::default(),
        })
    }

    /// Ports, addresses and endpoint of tenant `ns/name`. Pure for the kubernetes runtime;
    /// the process runtime allocates (once) and persists ports.
    pub fn placement(
        &self,
        ns: &str,
        name: &str,
        spec: &TenantControlPlaneSpec,
    ) -> Result<Placement, Error> {
        let svc = &spec.control_plane.service;
        let bracket = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            Runtime::Process(p) => {
                let ports = p.ports(&format!("{ns}.{name}"))?;
                let host = svc
                    .address
                    .clone()
                    .or_else(|| p.advertise_address().map(str::to_string))
                    .unwrap_or_else(|| "127.0.0.1".into());
                let ip = host.parse::<std::net::IpAddr>().ok();
                // Loopback stays loopback; anything else listens everywhere, so the
                // components' loopback kubeconfigs work as well as the nodes' address
                // (and a DNS name, which cannot be bound, resolves to whichever).
                let bind_address = match ip {
                    Some(ip) if ip.is_loopback() => host.clone(),
                    _ => "0.0.0.0".into(),
                };
                let konnectivity_endpoint =
                    konnectivity_endpoint(spec, &bracket(&host), ports.konnectivity_agent, false);
                Ok(Placement {
                    endpoint: format!("https://{}:{}", bracket(&host), ports.api),
                    konnectivity_endpoint,
                    ports,
                    bind_address,
                    advertise_address: advertise_ip(&host),
                    host,
                    replicas: 1,
                    readyz_wait: Duration::from_secs(60),
                })
            }
            Runtime::Kubernetes(_) => {
                let ports = Ports::in_pod(spec);
                let host = svc
                    .address
                    .clone()
                    .unwrap_or_else(|| format!("{name}.{ns}.svc"));
                let port = match (svc.type_, svc.node_port) {
                    (tether_api::tenant_control_plane::ServiceType::NodePort, Some(p)) => p,
                    _ => svc.port,
                };
                let node_port =
                    svc.type_ == tether_api::tenant_control_plane::ServiceType::NodePort;
                let konnectivity_endpoint = konnectivity_endpoint(
                    spec,
                    &bracket(&host),
                    ports.konnectivity_agent,
                    node_port,
                );
                Ok(Placement {
                    endpoint: format!("https://{}:{port}", bracket(&host)),
                    konnectivity_endpoint,
                    ports,
                    bind_address: "0.0.0.0".into(),
                    advertise_address: advertise_ip("0.0.0.0"),
                    host,
                    replicas: spec.control_plane.replicas.max(1) as u32,
                    // Pods take their time; check briefly and requeue instead of blocking.
                    readyz_wait: Duration::from_secs(2),
                })
            }
        }
    }

    /// Makes the tenant run `components`.
    pub async fn apply(
        &self,
        ns: &str,
        name: &str,
        spec: &TenantControlPlaneSpec,
        components: &[ComponentSpec],
        secrets: &process::SecretData,
        owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    ) -> Result<(), Error> {
        match self {
            Runtime::Process(p) => p.apply(&format!("{ns}.{name}"), components, secrets),
            Runtime::Kubernetes(k) => k.apply(ns, name, spec, components, owner).await,
        }
    }

    /// Stops and removes the tenant's components; objects of the same name that the tenant
    /// (uid `owner_uid`) does not own are left alone.
    pub async fn delete(&self, ns: &str, name: &str, owner_uid: Option<&str>) -> Result<(), Error> {
        match self {
            Runtime::Process(p) => p.delete(&format!("{ns}.{name}")),
            Runtime::Kubernetes(k) => k.delete(ns, name, owner_uid).await,
        }
    }

    /// Stops everything this operator runs (operator shutdown; a no-op for Deployments,
    /// which keep serving without the operator).
    pub async fn shutdown(&self) {
        if let Runtime::Process(p) = self {
            p.shutdown().await;
        }
    }
}

/// Image overrides by component name, for the kubernetes runtime.
pub type Images = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use tether_api::TenantControlPlaneSpec;

    #[test]
    fn konnectivity_endpoint_when_known() {
        let with = TenantControlPlaneSpec::default();
        let mut without = TenantControlPlaneSpec::default();
        without.addons.konnectivity = None;
        let cases = [
            (&with, false, Some("10.0.0.1:8132")),
            (&with, true, None),
            (&without, false, None),
        ];
        for (spec, node_port, want) in cases {
            assert_eq!(
                super::konnectivity_endpoint(spec, "10.0.0.1", 8132, node_port).as_deref(),
                want
            );
        }
    }

    #[test]
    fn advertise_address_is_an_ip() {
        assert_eq!(super::advertise_ip("0.0.0.0"), "127.0.0.1");
        assert_eq!(super::advertise_ip("192.0.2.4"), "192.0.2.4");
        assert_eq!(super::advertise_ip("api.example"), "127.0.0.1");
    }
}
