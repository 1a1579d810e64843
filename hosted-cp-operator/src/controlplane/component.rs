//! The runtime-neutral description of a component — binary, arguments, files, environment,
//! ports, health probe — that both runtimes run, and the argument sets that more than one
//! program of ours starts the same way (kube-apiserver, a one-member etcd).

use std::collections::BTreeMap;
use std::path::Path;

/// Which upstream program a component runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Program {
    /// kube-apiserver.
    KubeApiserver,
    /// kube-controller-manager.
    KubeControllerManager,
    /// kube-scheduler.
    KubeScheduler,
    /// konnectivity-server.
    KonnectivityServer,
    /// kine (etcd API over PostgreSQL).
    Kine,
    /// etcd (standalone mode's own management and datastore members; never rendered for
    /// tenants).
    Etcd,
    /// CNCF distribution's registry: standalone's artifact store (never a tenant's).
    Registry,
}

impl Program {
    /// The component name (also the container name and the process name).
    pub fn name(self) -> &'static str {
        match self {
            Program::KubeApiserver => "kube-apiserver",
            Program::KubeControllerManager => "kube-controller-manager",
            Program::KubeScheduler => "kube-scheduler",
            Program::KonnectivityServer => "konnectivity-server",
            Program::Kine => "kine",
            Program::Etcd => "etcd",
            Program::Registry => "registry",
        }
    }

    /// The binary-cache component.
    pub fn upstream(self) -> tether_upstream::Component {
        use tether_upstream::Component as C;
        match self {
            Program::KubeApiserver => C::KubeApiserver,
            Program::KubeControllerManager => C::KubeControllerManager,
            Program::KubeScheduler => C::KubeScheduler,
            Program::KonnectivityServer => C::KonnectivityServer,
            Program::Kine => C::Kine,
            Program::Etcd => C::Etcd,
            Program::Registry => C::Registry,
        }
    }

    /// The command that runs the program in its [`Program::image`]: upstream's konnectivity
    /// image holds `/proxy-server` (apiserver-network-proxy v0.36.0
    /// `artifacts/images/server-build.Dockerfile`), not a binary named after the component.
    pub fn image_command(self) -> &'static str {
        match self {
            Program::KonnectivityServer => "/proxy-server",
            p => p.name(),
        }
    }

    /// The default container image on the `kubernetes` runtime.
    pub fn image(self, kubernetes: &str) -> String {
        let pins = tether_upstream::Pins::default();
        match self {
            Program::KonnectivityServer => format!(
                "registry.k8s.io/kas-network-proxy/proxy-server:{}",
                pins.version_for(self.upstream(), kubernetes)
                    .unwrap_or_else(|_| "v0.36.0".into())
            ),
            Program::Kine => format!("rancher/kine:{}", pins.kine),
            Program::Etcd => format!(
                "registry.k8s.io/etcd:{}-0",
                pins.etcd.trim_start_matches('v')
            ),
            Program::Registry => format!("distribution/registry:{}", pins.registry),
            p => format!("registry.k8s.io/{}:{kubernetes}", p.name()),
        }
    }
}

/// A file a component reads: `path` (relative to its working directory) holds key `key`
/// of Secret `secret`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileRef {
    /// Relative path, e.g. `pki/ca.crt`.
    pub path: String,
    /// Secret name.
    pub secret: String,
    /// Key in the Secret.
    pub key: String,
}

/// An environment variable's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    /// A literal.
    Literal(String),
    /// A key of a Secret (for values that must not appear in arguments, like a DSN).
    Secret {
        /// Secret name.
        secret: String,
        /// Key.
        key: String,
    },
}

/// How a runtime checks a component is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `https` or `http`.
    pub scheme: &'static str,
    /// Port name (see [`ComponentSpec::ports`]).
    pub port: &'static str,
    /// Path, e.g. `/readyz`.
    pub path: &'static str,
}

/// One component, ready to be run by any runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSpec {
    /// Which program.
    pub program: Program,
    /// Kubernetes version of the binary / image.
    pub version: String,
    /// Arguments, with relative file paths.
    pub args: Vec<String>,
    /// Files to provide.
    pub files: Vec<FileRef>,
    /// Environment variables.
    pub env: BTreeMap<String, EnvValue>,
    /// Named ports it listens on.
    pub ports: Vec<(&'static str, u16)>,
    /// Health probe.
    pub probe: Probe,
}

/// The kube-apiserver flags that every API server Tether starts sets the same way — a
/// tenant's, standalone's management API and the test harness's: where it listens, its
/// serving certificate, the client CA, service-account signing, the Service range, the
/// authorizers and its etcd. Each reads `apiserver.crt`/`.key` and `sa.pub`/`sa.key` from
/// one PKI directory.
///
/// What differs stays with the caller, for a reason: only a tenant faces kubelets through
/// a front proxy and konnectivity (kubelet client, request-header, egress-selector flags) and
/// keeps its data under an etcd prefix with TLS; the management API admits no nodes (no
/// bootstrap tokens, RBAC only); the harness runs nodes of tests (bootstrap tokens,
/// privileged pods) without the tenant's admission plugin.
#[derive(Debug, Clone)]
pub struct ApiserverArgs<'a> {
    /// `--etcd-servers` (comma-separated URLs).
    pub etcd_servers: &'a str,
    /// `--bind-address`.
    pub bind_address: &'a str,
    /// `--advertise-address` (an IP).
    pub advertise_address: &'a str,
    /// `--secure-port`.
    pub secure_port: u16,
    /// The directory (relative to the working directory, or absolute) of the PKI files.
    pub pki_dir: &'a str,
    /// File name in `pki_dir` of the CA bundle client certificates are checked against.
    pub client_ca: &'a str,
    /// `--service-account-issuer`.
    pub service_account_issuer: &'a str,
    /// `--service-cluster-ip-range`.
    pub service_cidr: &'a str,
    /// `--authorization-mode`.
    pub authorization_mode: &'a str,
}

impl ApiserverArgs<'_> {
    /// The flags, in a fixed order.
    pub fn args(&self) -> Vec<String> {
        let pki = |file: &str| format!("{}/{file}", self.pki_dir);
        vec![
            format!("--advertise-address={}", self.advertise_address),
            format!("--bind-address={}", self.bind_address),
            format!("--secure-port={}", self.secure_port),
            format!("--authorization-mode={}", self.authorization_mode),
            format!("--client-ca-file={}", pki(self.client_ca)),
            format!("--tls-cert-file={}", pki("apiserver.crt")),
            format!("--tls-private-key-file={}", pki("apiserver.key")),
            format!("--service-account-issuer={}", self.service_account_issuer),
            format!("--service-account-key-file={}", pki("sa.pub")),
            format!("--service-account-signing-key-file={}", pki("sa.key")),
            format!("--service-cluster-ip-range={}", self.service_cidr),
            format!("--etcd-servers={}", self.etcd_servers),
        ]
    }
}

/// A one-member etcd on loopback named `name`, serving clients over `scheme` on
/// `ports.0` (peers stay plain HTTP on `ports.1`, also loopback-only), probed on `/health`:
/// standalone's management and datastore members and the test harness's. `extra` carries
/// TLS, compaction and durability flags.
pub fn single_member_etcd(
    name: &str,
    data_dir: &Path,
    scheme: &'static str,
    (client, peer): (u16, u16),
    extra: Vec<String>,
) -> ComponentSpec {
    let mut args = vec![
        format!("--name={name}"),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={scheme}://127.0.0.1:{client}"),
        format!("--advertise-client-urls={scheme}://127.0.0.1:{client}"),
        format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-cluster={name}=http://127.0.0.1:{peer}"),
    ];
    args.extend(extra);
    args.push("--listen-metrics-urls=".into());
    ComponentSpec {
        program: Program::Etcd,
        version: String::new(),
        args,
        files: vec![],
        env: BTreeMap::new(),
        ports: vec![],
        probe: Probe {
            scheme,
            port: "",
            path: "/health",
        },
    }
}
