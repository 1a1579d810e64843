//! Rendering a tenant's components into one runtime-neutral description.
//!
//! Every component is a [`ComponentSpec`]: which binary, its arguments, the files it reads
//! (each one a key of one Secret), environment, ports and a health probe. Paths in
//! arguments are relative to the component's working directory, which both runtimes lay out
//! the same way (`pki/`, `kubeconfigs/`, `datastore/`, `config/`): the `process` runtime
//! writes the Secrets' keys there, the `kubernetes` runtime mounts the Secrets there. So both
//! runtimes run byte-identical arguments; only the port numbers differ (allocated per tenant
//! by the process runtime, fixed inside a pod).

use std::collections::BTreeMap;

use tether_api::tenant_control_plane::Cidr;
use tether_api::{Driver, TenantControlPlaneSpec};

use super::component::{ApiserverArgs, ComponentSpec, EnvValue, FileRef, Probe, Program};

/// The ports one tenant's components listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ports {
    /// kube-apiserver `--secure-port`.
    pub api: u16,
    /// konnectivity agents' port.
    pub konnectivity_agent: u16,
    /// konnectivity admin port (loopback).
    pub konnectivity_admin: u16,
    /// konnectivity health port.
    pub konnectivity_health: u16,
    /// controller-manager secure port (loopback).
    pub controller_manager: u16,
    /// scheduler secure port (loopback).
    pub scheduler: u16,
    /// kine's etcd port (loopback; postgres tenants only).
    pub kine: u16,
}

impl Ports {
    /// The ports inside a pod: upstream defaults.
    pub fn in_pod(spec: &TenantControlPlaneSpec) -> Ports {
        Ports {
            api: spec.control_plane.service.port,
            konnectivity_agent: spec.addons.konnectivity.as_ref().map_or(8132, |k| k.port),
            konnectivity_admin: 8133,
            konnectivity_health: 8134,
            controller_manager: 10257,
            scheduler: 10259,
            kine: 2379,
        }
    }
}

/// Where the tenant's data lives, as the API server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// A shared etcd with TLS client-certificate auth; the certificate's CN is the
    /// tenant's etcd user, limited to `prefix`.
    Etcd {
        /// `https://host:port` of each member.
        servers: Vec<String>,
        /// The tenant's key prefix.
        prefix: String,
    },
    /// PostgreSQL through a kine next to the API server; `dsn_secret` holds the DSN under
    /// key `dsn` (so the password never shows up in arguments).
    Kine {
        /// Secret with the DSN.
        dsn_secret: String,
    },
}

/// The names of a tenant's Secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    /// PKI files.
    pub pki: String,
    /// Component kubeconfigs.
    pub kubeconfigs: String,
    /// Datastore client credentials.
    pub datastore: String,
    /// Generated configuration files (egress selector).
    pub config: String,
}

impl Secrets {
    /// The conventional names for tenant `name`.
    pub fn for_tenant(name: &str) -> Secrets {
        Secrets {
            pki: format!("{name}-pki"),
            kubeconfigs: format!("{name}-kubeconfigs"),
            datastore: format!("{name}-datastore"),
            config: format!("{name}-config"),
        }
    }
}

/// Everything rendering needs besides the spec.
#[derive(Debug, Clone)]
pub struct RenderInputs<'a> {
    /// The spec.
    pub spec: &'a TenantControlPlaneSpec,
    /// Version to run (the spec's, or during an upgrade the step being rolled).
    pub version: &'a str,
    /// Datastore.
    pub storage: Storage,
    /// Ports.
    pub ports: Ports,
    /// Address the API server binds to.
    pub bind_address: String,
    /// The IP the API server advertises (the `kubernetes` Service's endpoint): where nodes
    /// reach it.
    pub advertise_address: String,
    /// Secret names.
    pub secrets: Secrets,
    /// Instances of each component running at once (leader election above one; every
    /// konnectivity agent holds a stream to each konnectivity-server).
    pub replicas: u32,
}

fn f(path: &str, secret: &str, key: &str) -> FileRef {
    FileRef {
        path: path.into(),
        secret: secret.into(),
        key: key.into(),
    }
}

/// The apiserver's egress selector: `cluster` traffic (to nodes: logs, exec, port-forward)
/// goes through konnectivity over a unix socket, everything else directly.
pub const EGRESS_SELECTOR: &str = "apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: GRPC
    transport:
      uds:
        udsName: konnectivity/konnectivity-server.socket
";

/// Key of [`EGRESS_SELECTOR`] in the config Secret.
pub const EGRESS_SELECTOR_KEY: &str = "egress-selector.yaml";

/// Every component of the tenant, in start order (kine, apiserver, konnectivity,
/// controller-manager, scheduler).
pub fn render(i: &RenderInputs<'_>) -> Vec<ComponentSpec> {
    let mut out = Vec::new();
    if let Storage::Kine { dsn_secret } = &i.storage {
        out.push(kine(i, dsn_secret));
    }
    out.push(apiserver(i));
    if i.spec.addons.konnectivity.is_some() {
        out.push(konnectivity(i));
    }
    out.push(controller_manager(i));
    out.push(scheduler(i));
    out
}

fn pki_files(i: &RenderInputs<'_>, names: &[&str]) -> Vec<FileRef> {
    names
        .iter()
        .map(|n| f(&format!("pki/{n}"), &i.secrets.pki, n))
        .collect()
}

fn apiserver(i: &RenderInputs<'_>) -> ComponentSpec {
    let np = &i.spec.network_profile;
    let etcd_servers = match &i.storage {
        Storage::Etcd { servers, .. } => servers.join(","),
        Storage::Kine { .. } => format!("http://127.0.0.1:{}", i.ports.kine),
    };
    let mut args = ApiserverArgs {
        etcd_servers: &etcd_servers,
        bind_address: &i.bind_address,
        advertise_address: &i.advertise_address,
        secure_port: i.ports.api,
        pki_dir: "pki",
        client_ca: "client-ca.crt",
        service_account_issuer: &format!("https://kubernetes.default.svc.{}", np.cluster_domain),
        service_cidr: &np.service_cidr,
        authorization_mode: "Node,RBAC",
    }
    .args();
    args.extend(
        [
            // Kubelets join with bootstrap tokens and may only touch their own Node.
            "--allow-privileged=true",
            "--enable-admission-plugins=NodeRestriction",
            "--enable-bootstrap-token-auth=true",
            // Kubelets' serving certificates (serverTLSBootstrap) are checked against the
            // CAs the tenant trusts, both during a CA rotation.
            "--kubelet-certificate-authority=pki/client-ca.crt",
            "--kubelet-client-certificate=pki/apiserver-kubelet-client.crt",
            "--kubelet-client-key=pki/apiserver-kubelet-client.key",
            "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname",
            "--proxy-client-cert-file=pki/front-proxy-client.crt",
            "--proxy-client-key-file=pki/front-proxy-client.key",
            "--requestheader-client-ca-file=pki/front-proxy-ca.crt",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-username-headers=X-Remote-User",
            // The datastore's own compaction runs instead: a tenant's etcd user may only
            // touch its prefix, and the apiserver's compactor writes a key outside it.
            "--etcd-compaction-interval=0",
        ]
        .map(String::from),
    );
    let mut files = pki_files(
        i,
        &[
            "client-ca.crt",
            "apiserver.crt",
            "apiserver.key",
            "apiserver-kubelet-client.crt",
            "apiserver-kubelet-client.key",
            "front-proxy-client.crt",
            "front-proxy-client.key",
            "front-proxy-ca.crt",
            "sa.pub",
            "sa.key",
        ],
    );
    if let Storage::Etcd { prefix, .. } = &i.storage {
        args.push(format!("--etcd-prefix={prefix}"));
        args.push("--etcd-cafile=datastore/ca.crt".into());
        args.push("--etcd-certfile=datastore/client.crt".into());
        args.push("--etcd-keyfile=datastore/client.key".into());
        for k in ["ca.crt", "client.crt", "client.key"] {
            files.push(f(&format!("datastore/{k}"), &i.secrets.datastore, k));
        }
    }
    if i.spec.addons.konnectivity.is_some() {
        args.push(format!(
            "--egress-selector-config-file=config/{EGRESS_SELECTOR_KEY}"
        ));
        files.push(f(
            &format!("config/{EGRESS_SELECTOR_KEY}"),
            &i.secrets.config,
            EGRESS_SELECTOR_KEY,
        ));
    }
    args.extend(i.spec.api_server.extra_args.iter().cloned());
    ComponentSpec {
        program: Program::KubeApiserver,
        version: i.version.to_string(),
        args,
        files,
        env: BTreeMap::new(),
        ports: vec![("api", i.ports.api)],
        probe: Probe {
            scheme: "https",
            port: "api",
            path: "/readyz",
        },
    }
}

fn controller_manager(i: &RenderInputs<'_>) -> ComponentSpec {
    let np = &i.spec.network_profile;
    let kc = "kubeconfigs/controller-manager.conf";
    let args = vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", i.ports.controller_manager),
        "--client-ca-file=pki/client-ca.crt".into(),
        "--requestheader-client-ca-file=pki/front-proxy-ca.crt".into(),
        // During a CA rotation new certificates come from the next CA.
        "--cluster-signing-cert-file=pki/signing-ca.crt".into(),
        "--cluster-signing-key-file=pki/signing-ca.key".into(),
        "--root-ca-file=pki/client-ca.crt".into(),
        "--service-account-private-key-file=pki/sa.key".into(),
        format!("--service-cluster-ip-range={}", np.service_cidr),
        format!("--cluster-cidr={}", np.pod_cidr),
        "--allocate-node-cidrs=true".into(),
        "--controllers=*,bootstrapsigner,tokencleaner".into(),
        "--use-service-account-credentials=true".into(),
        format!("--leader-elect={}", i.replicas > 1),
    ];
    let mut files = pki_files(
        i,
        &[
            "client-ca.crt",
            "signing-ca.crt",
            "signing-ca.key",
            "front-proxy-ca.crt",
            "sa.key",
        ],
    );
    files.push(f(kc, &i.secrets.kubeconfigs, "controller-manager.conf"));
    ComponentSpec {
        program: Program::KubeControllerManager,
        version: i.version.to_string(),
        args,
        files,
        env: BTreeMap::new(),
        ports: vec![("metrics", i.ports.controller_manager)],
        probe: Probe {
            scheme: "https",
            port: "metrics",
            path: "/healthz",
        },
    }
}

fn scheduler(i: &RenderInputs<'_>) -> ComponentSpec {
    let kc = "kubeconfigs/scheduler.conf";
    ComponentSpec {
        program: Program::KubeScheduler,
        version: i.version.to_string(),
        args: vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", i.ports.scheduler),
            format!("--leader-elect={}", i.replicas > 1),
        ],
        files: vec![f(kc, &i.secrets.kubeconfigs, "scheduler.conf")],
        env: BTreeMap::new(),
        ports: vec![("metrics", i.ports.scheduler)],
        probe: Probe {
            scheme: "https",
            port: "metrics",
            path: "/healthz",
        },
    }
}

/// The audience of the tokens konnectivity agents present.
pub const AGENT_AUDIENCE: &str = "system:konnectivity-server";
/// The ServiceAccount (in the tenant's `kube-system`) whose tokens agents present.
pub const AGENT_SERVICE_ACCOUNT: &str = "konnectivity-agent";

/// konnectivity-server: the frontend on a unix socket the apiserver shares, agents on TCP
/// with ServiceAccount-token authentication, dials routed to the agent announcing the
/// destination host (a kubelet) and else to any agent (pods, webhooks, aggregated APIs).
/// `--server-count` is the number of instances behind the one agent endpoint, so each agent
/// holds a stream to every one of them.
fn konnectivity(i: &RenderInputs<'_>) -> ComponentSpec {
    let kc = "kubeconfigs/konnectivity-server.conf";
    let mut files = pki_files(i, &["konnectivity-server.crt", "konnectivity-server.key"]);
    files.push(f(kc, &i.secrets.kubeconfigs, "konnectivity-server.conf"));
    ComponentSpec {
        program: Program::KonnectivityServer,
        version: i.version.to_string(),
        args: vec![
            "--uds-name=konnectivity/konnectivity-server.socket".into(),
            "--delete-existing-uds-file=true".into(),
            "--server-port=0".into(),
            "--mode=grpc".into(),
            format!("--agent-bind-address={}", i.bind_address),
            format!("--agent-port={}", i.ports.konnectivity_agent),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-port={}", i.ports.konnectivity_admin),
            "--health-bind-address=127.0.0.1".into(),
            format!("--health-port={}", i.ports.konnectivity_health),
            "--cluster-cert=pki/konnectivity-server.crt".into(),
            "--cluster-key=pki/konnectivity-server.key".into(),
            format!("--kubeconfig={kc}"),
            format!("--authentication-audience={AGENT_AUDIENCE}"),
            "--agent-namespace=kube-system".into(),
            format!("--agent-service-account={AGENT_SERVICE_ACCOUNT}"),
            "--proxy-strategies=destHost,default".into(),
            format!("--server-count={}", i.replicas.max(1)),
        ],
        files,
        env: BTreeMap::new(),
        ports: vec![
            ("agent", i.ports.konnectivity_agent),
            ("admin", i.ports.konnectivity_admin),
            ("health", i.ports.konnectivity_health),
        ],
        probe: Probe {
            scheme: "http",
            port: "health",
            path: "/healthz",
        },
    }
}

fn kine(i: &RenderInputs<'_>, dsn_secret: &str) -> ComponentSpec {
    ComponentSpec {
        program: Program::Kine,
        version: i.version.to_string(),
        args: vec![
            format!("--listen-address=127.0.0.1:{}", i.ports.kine),
            "--metrics-bind-address=0".into(),
        ],
        // The DSN carries a password: it comes from the Secret as an environment variable,
        // never on the command line (which any local user can read).
        files: vec![],
        env: BTreeMap::from([(
            "KINE_ENDPOINT".to_string(),
            EnvValue::Secret {
                secret: dsn_secret.to_string(),
                key: "dsn".into(),
            },
        )]),
        ports: vec![("etcd", i.ports.kine)],
        probe: Probe {
            scheme: "tcp",
            port: "etcd",
            path: "",
        },
    }
}

/// The API server's Service IP (first address of the service range) for the SANs.
pub fn service_ip(spec: &TenantControlPlaneSpec) -> Option<std::net::IpAddr> {
    Cidr::parse(&spec.network_profile.service_cidr).ok()?.nth(1)
}

/// Whether the spec's datastore driver needs kine.
pub fn needs_kine(driver: Driver) -> bool {
    driver == Driver::Postgres
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::tenant_control_plane::KubernetesSpec;

    fn spec() -> TenantControlPlaneSpec {
        TenantControlPlaneSpec {
            kubernetes: KubernetesSpec {
                version: "v1.36.3".into(),
            },
            ..Default::default()
        }
    }

    fn inputs(spec: &TenantControlPlaneSpec, storage: Storage) -> RenderInputs<'_> {
        RenderInputs {
            spec,
            version: "v1.36.3",
            storage,
            ports: Ports::in_pod(spec),
            bind_address: "127.0.0.1".into(),
            advertise_address: "127.0.0.1".into(),
            secrets: Secrets::for_tenant("t1"),
            replicas: 1,
        }
    }

    fn etcd() -> Storage {
        Storage::Etcd {
            servers: vec!["https://127.0.0.1:2379".into()],
            prefix: "/tether/ns/t1".into(),
        }
    }

    fn arg<'a>(c: &'a ComponentSpec, flag: &str) -> Option<&'a str> {
        c.args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
    }

    #[test]
    fn components_and_key_flags() {
        let s = spec();
        type Check<'a> = (Program, &'a str, Option<&'a str>);
        let table: &[(&str, Storage, &[Check])] = &[
            (
                "etcd",
                etcd(),
                &[
                    (
                        Program::KubeApiserver,
                        "etcd-servers",
                        Some("https://127.0.0.1:2379"),
                    ),
                    (Program::KubeApiserver, "etcd-prefix", Some("/tether/ns/t1")),
                    (
                        Program::KubeApiserver,
                        "etcd-certfile",
                        Some("datastore/client.crt"),
                    ),
                    (Program::KubeApiserver, "secure-port", Some("6443")),
                    (
                        Program::KubeApiserver,
                        "service-cluster-ip-range",
                        Some("10.96.0.0/16"),
                    ),
                    (
                        Program::KubeApiserver,
                        "egress-selector-config-file",
                        Some("config/egress-selector.yaml"),
                    ),
                    (
                        Program::KubeApiserver,
                        "kubelet-certificate-authority",
                        Some("pki/client-ca.crt"),
                    ),
                    (
                        Program::KubeApiserver,
                        "service-account-issuer",
                        Some("https://kubernetes.default.svc.cluster.local"),
                    ),
                    (
                        Program::KubeControllerManager,
                        "cluster-cidr",
                        Some("10.244.0.0/16"),
                    ),
                    (
                        Program::KubeControllerManager,
                        "controllers",
                        Some("*,bootstrapsigner,tokencleaner"),
                    ),
                    (
                        Program::KubeControllerManager,
                        "leader-elect",
                        Some("false"),
                    ),
                    (
                        Program::KubeScheduler,
                        "kubeconfig",
                        Some("kubeconfigs/scheduler.conf"),
                    ),
                    (Program::KonnectivityServer, "agent-port", Some("8132")),
                    (
                        Program::KonnectivityServer,
                        "uds-name",
                        Some("konnectivity/konnectivity-server.socket"),
                    ),
                ],
            ),
            (
                "kine",
                Storage::Kine {
                    dsn_secret: "t1-datastore".into(),
                },
                &[
                    (Program::Kine, "listen-address", Some("127.0.0.1:2379")),
                    (
                        Program::KubeApiserver,
                        "etcd-servers",
                        Some("http://127.0.0.1:2379"),
                    ),
                    (Program::KubeApiserver, "etcd-prefix", None),
                    (Program::KubeApiserver, "etcd-certfile", None),
                ],
            ),
        ];
        for (name, storage, checks) in table {
            let comps = render(&inputs(&s, storage.clone()));
            for (program, flag, want) in *checks {
                let c = comps
                    .iter()
                    .find(|c| c.program == *program)
                    .unwrap_or_else(|| panic!("{name}: no {program:?}"));
                assert_eq!(arg(c, flag), *want, "{name}: {program:?} --{flag}");
            }
        }
    }

    #[test]
    fn every_referenced_file_is_provided() {
        let s = spec();
        for storage in [
            etcd(),
            Storage::Kine {
                dsn_secret: "x".into(),
            },
        ] {
            for c in render(&inputs(&s, storage)) {
                for a in &c.args {
                    let Some((_, v)) = a.split_once('=') else {
                        continue;
                    };
                    let rel = ["pki/", "kubeconfigs/", "datastore/", "config/"];
                    if rel.iter().any(|p| v.starts_with(p)) {
                        assert!(
                            c.files.iter().any(|f| f.path == v),
                            "{:?}: {a} has no file",
                            c.program
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn addons_and_extra_args_change_the_output() {
        let mut s = spec();
        s.addons.konnectivity = None;
        s.api_server.extra_args = vec!["--v=3".into()];
        let comps = render(&inputs(&s, etcd()));
        assert!(
            !comps
                .iter()
                .any(|c| c.program == Program::KonnectivityServer)
        );
        let api = &comps[0];
        assert_eq!(arg(api, "egress-selector-config-file"), None);
        assert_eq!(api.args.last().unwrap(), "--v=3");
    }

    #[test]
    fn service_ip_is_first_address() {
        assert_eq!(service_ip(&spec()).unwrap().to_string(), "10.96.0.1");
    }
}
