//! The pinned versions and where each component comes from.
//!
//! Why these numbers is logged in `docs/decisions.md`; bump them together with that file.

use crate::{Error, Result};

/// The versions Tether builds and runs by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    /// Kubernetes release for tenant control planes and kubelets.
    pub kubernetes: &'static str,
    /// The previous minor, built lazily for upgrade tests.
    pub kubernetes_previous: &'static str,
    /// etcd, for the management plane and shared tenant datastores.
    pub etcd: &'static str,
    /// kine, which puts a PostgreSQL database behind the etcd API.
    pub kine: &'static str,
    /// containerd (2.x: Kubernetes 1.36 dropped containerd 1.x), its runc shim and `ctr`.
    pub containerd: &'static str,
    /// runc, the OCI runtime containerd's shim runs.
    pub runc: &'static str,
    /// The CNI reference plugins (bridge, host-local, loopback, portmap).
    pub cni_plugins: &'static str,
    /// CoreDNS, the tenant's cluster DNS.
    pub coredns: &'static str,
    /// CNCF distribution's `registry`, the management plane's artifact store.
    pub registry: &'static str,
    /// go-containerregistry's `crane`, which builds and pushes images without a daemon.
    pub crane: &'static str,
    /// The pause image's tag: kubeadm's `PauseVersion` for the pinned Kubernetes (the
    /// binary is compiled from that release's `build/pause/linux/pause.c`).
    pub pause: &'static str,
}

impl Pins {
    /// The pinned set. A function rather than a constant so callers can be handed other pins
    /// in tests without global state.
    pub const fn default_set() -> Pins {
        Pins {
            kubernetes: "v1.36.3",
            kubernetes_previous: "v1.35.4",
            etcd: "v3.6.16",
            kine: "v0.17.5",
            containerd: "v2.4.2",
            runc: "v1.5.3",
            cni_plugins: "v1.10.0",
            coredns: "v1.14.7",
            registry: "v3.1.2",
            crane: "v0.22.1",
            pause: "3.10.2",
        }
    }

    /// The version of `component` that goes with Kubernetes `kubernetes` (the konnectivity
    /// release follows the Kubernetes minor; etcd and kine are independent of it).
    pub fn version_for(&self, component: Component, kubernetes: &str) -> Result<String> {
        Ok(match component.module() {
            Module::Kubernetes => kubernetes.to_string(),
            Module::Konnectivity => konnectivity_for(kubernetes)?.to_string(),
            Module::EtcdServer | Module::Etcdctl => self.etcd.to_string(),
            Module::Kine => self.kine.to_string(),
            Module::Containerd => self.containerd.to_string(),
            Module::Runc => self.runc.to_string(),
            Module::CniPlugins => self.cni_plugins.to_string(),
            Module::Coredns => self.coredns.to_string(),
            Module::Distribution => self.registry.to_string(),
            Module::Crane => self.crane.to_string(),
        })
    }

    /// Every component at its default version: what `cargo xtask deps` builds eagerly.
    pub fn defaults(&self) -> Result<Vec<(Component, String)>> {
        Component::ALL
            .iter()
            .map(|c| Ok((*c, self.version_for(*c, self.kubernetes)?)))
            .collect()
    }
}

/// The binaries a node installs from the artifact store (kubelet, containerd, its runc
/// shim and `ctr` (which imports the image's baked pause archive), runc, the CNI plugins), in the order they are pushed: one list for the pusher
/// (`tether-image node-artifacts`) and the operator that names them in desired configs.
pub const NODE_COMPONENTS: &[Component] = &[
    Component::Kubelet,
    Component::Containerd,
    Component::ContainerdShimRuncV2,
    Component::Ctr,
    Component::Runc,
    Component::CniBridge,
    Component::CniHostLocal,
    Component::CniLoopback,
    Component::CniPortmap,
];

impl Default for Pins {
    fn default() -> Self {
        Pins::default_set()
    }
}

/// The apiserver-network-proxy release for a Kubernetes version. ANP versions its releases
/// `v0.<k8s minor>.x`; not every minor is published as a module, so older minors use the
/// nearest earlier release (the `AgentService` protocol has been stable across them).
fn konnectivity_for(kubernetes: &str) -> Result<&'static str> {
    match minor_of(kubernetes)? {
        36.. => Ok("v0.36.0"),
        34 | 35 => Ok("v0.34.0"),
        _ => Err(Error::BadVersion(format!(
            "{kubernetes} (no konnectivity release pinned for it)"
        ))),
    }
}

/// The minor number of a `vMAJOR.MINOR.PATCH` version.
pub fn minor_of(version: &str) -> Result<u32> {
    let bad = || Error::BadVersion(version.to_string());
    let rest = version.strip_prefix('v').ok_or_else(bad)?;
    let mut parts = rest.split('.');
    let (major, minor, patch) = (parts.next(), parts.next(), parts.next());
    if parts.next().is_some() {
        return Err(bad());
    }
    for p in [major, minor, patch] {
        let p = p.ok_or_else(bad)?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
    }
    minor.unwrap().parse().map_err(|_| bad())
}

/// A Go module Tether builds binaries from. Each gets its own small wrapper module in the
/// cache so upstream `replace` directives can be turned into versioned requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    /// `k8s.io/kubernetes`.
    Kubernetes,
    /// `sigs.k8s.io/apiserver-network-proxy`.
    Konnectivity,
    /// `go.etcd.io/etcd/server/v3`.
    EtcdServer,
    /// `go.etcd.io/etcd/etcdctl/v3`.
    Etcdctl,
    /// `github.com/k3s-io/kine`.
    Kine,
    /// `github.com/containerd/containerd/v2`.
    Containerd,
    /// `github.com/opencontainers/runc` (cgo: its namespace setup is C).
    Runc,
    /// `github.com/containernetworking/plugins`.
    CniPlugins,
    /// `github.com/coredns/coredns`.
    Coredns,
    /// `github.com/distribution/distribution/v3`.
    Distribution,
    /// `github.com/google/go-containerregistry`.
    Crane,
}

impl Module {
    /// The Go module path.
    pub fn path(self) -> &'static str {
        match self {
            Module::Kubernetes => "k8s.io/kubernetes",
            Module::Konnectivity => "sigs.k8s.io/apiserver-network-proxy",
            Module::EtcdServer => "go.etcd.io/etcd/server/v3",
            Module::Etcdctl => "go.etcd.io/etcd/etcdctl/v3",
            Module::Kine => "github.com/k3s-io/kine",
            Module::Containerd => "github.com/containerd/containerd/v2",
            Module::Runc => "github.com/opencontainers/runc",
            Module::CniPlugins => "github.com/containernetworking/plugins",
            Module::Coredns => "github.com/coredns/coredns",
            Module::Distribution => "github.com/distribution/distribution/v3",
            Module::Crane => "github.com/google/go-containerregistry",
        }
    }

    /// Short name used for the wrapper module's directory.
    pub fn slug(self) -> &'static str {
        match self {
            Module::Kubernetes => "kubernetes",
            Module::Konnectivity => "apiserver-network-proxy",
            Module::EtcdServer => "etcd-server",
            Module::Etcdctl => "etcdctl",
            Module::Kine => "kine",
            Module::Containerd => "containerd",
            Module::Runc => "runc",
            Module::CniPlugins => "cni-plugins",
            Module::Coredns => "coredns",
            Module::Distribution => "distribution",
            Module::Crane => "go-containerregistry",
        }
    }

    /// Whether the build needs cgo. Only runc does: `libcontainer/nsenter` is C that runs
    /// before the Go runtime starts, and seccomp filters come from libseccomp. It is linked
    /// statically (libc and libseccomp included), as upstream's release binaries are, so it
    /// runs on any node.
    pub fn cgo(self) -> bool {
        matches!(self, Module::Runc)
    }

    /// Go build tags.
    pub fn tags(self) -> &'static str {
        match self {
            Module::Runc => "seccomp urfave_cli_no_docs netgo osusergo",
            _ => "",
        }
    }

    /// The version at which the module's sibling modules (those its go.mod replaces with
    /// local paths) are published: Kubernetes' staging repos are `v0.<minor>.<patch>`,
    /// everything else shares the main module's version.
    pub fn sibling_version(self, version: &str) -> String {
        match self {
            Module::Kubernetes => format!("v0.{}", version.trim_start_matches("v1.")),
            _ => version.to_string(),
        }
    }

    /// Linker flags that stamp the version into the binary the way upstream's release
    /// builds do (a kubelet reporting `v0.0.0` would break version-skew checks).
    pub fn ldflags(self, version: &str) -> Result<String> {
        let mut flags = String::from("-s -w");
        match self {
            Module::Kubernetes => {
                let minor = minor_of(version)?;
                for pkg in [
                    "k8s.io/component-base/version",
                    "k8s.io/client-go/pkg/version",
                ] {
                    flags.push_str(&format!(
                        " -X {pkg}.gitVersion={version} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} \
                         -X {pkg}.gitTreeState=clean -X {pkg}.buildDate=1970-01-01T00:00:00Z"
                    ));
                }
            }
            Module::Kine => {
                flags.push_str(&format!(
                    " -X github.com/k3s-io/kine/pkg/version.Version={version}"
                ));
            }
            Module::Containerd => {
                let pkg = "github.com/containerd/containerd/v2/version";
                flags.push_str(&format!(
                    " -X {pkg}.Version={version} -X {pkg}.Revision=tether"
                ));
            }
            Module::Runc => {
                let bare = version.trim_start_matches('v');
                flags.push_str(&format!(
                    " -X main.version={bare} -linkmode external -extldflags=-static"
                ));
            }
            Module::CniPlugins => {
                flags.push_str(&format!(
                    " -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion={version}"
                ));
            }
            Module::Distribution => {
                flags.push_str(&format!(
                    " -X github.com/distribution/distribution/v3/version.version={version}"
                ));
            }
            Module::Crane => {
                flags.push_str(&format!(
                    " -X github.com/google/go-containerregistry/cmd/crane/cmd.Version={version}"
                ));
            }
            Module::Konnectivity | Module::EtcdServer | Module::Etcdctl | Module::Coredns => {}
        }
        Ok(flags)
    }
}

/// One upstream binary Tether runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    KubeApiserver,
    KubeControllerManager,
    KubeScheduler,
    Kubelet,
    KubeProxy,
    Kubectl,
    KonnectivityServer,
    KonnectivityAgent,
    Etcd,
    Etcdctl,
    Kine,
    Containerd,
    ContainerdShimRuncV2,
    Ctr,
    Runc,
    CniBridge,
    CniHostLocal,
    CniLoopback,
    CniPortmap,
    Coredns,
    Registry,
    Crane,
}

impl Component {
    /// Every component, in build order (components of one module are adjacent so the Go
    /// build cache is hot for the second one).
    pub const ALL: [Component; 22] = [
        Component::KubeApiserver,
        Component::KubeControllerManager,
        Component::KubeScheduler,
        Component::Kubectl,
        Component::Kubelet,
        Component::KubeProxy,
        Component::KonnectivityServer,
        Component::KonnectivityAgent,
        Component::Etcd,
        Component::Etcdctl,
        Component::Kine,
        Component::Containerd,
        Component::ContainerdShimRuncV2,
        Component::Ctr,
        Component::Runc,
        Component::CniBridge,
        Component::CniHostLocal,
        Component::CniLoopback,
        Component::CniPortmap,
        Component::Coredns,
        Component::Registry,
        Component::Crane,
    ];

    /// The binary's file name (also its directory name in the cache).
    pub fn name(self) -> &'static str {
        match self {
            Component::KubeApiserver => "kube-apiserver",
            Component::KubeControllerManager => "kube-controller-manager",
            Component::KubeScheduler => "kube-scheduler",
            Component::Kubelet => "kubelet",
            Component::KubeProxy => "kube-proxy",
            Component::Kubectl => "kubectl",
            Component::KonnectivityServer => "konnectivity-server",
            Component::KonnectivityAgent => "konnectivity-agent",
            Component::Etcd => "etcd",
            Component::Etcdctl => "etcdctl",
            Component::Kine => "kine",
            Component::Containerd => "containerd",
            Component::ContainerdShimRuncV2 => "containerd-shim-runc-v2",
            Component::Ctr => "ctr",
            Component::Runc => "runc",
            Component::CniBridge => "bridge",
            Component::CniHostLocal => "host-local",
            Component::CniLoopback => "loopback",
            Component::CniPortmap => "portmap",
            Component::Coredns => "coredns",
            Component::Registry => "registry",
            Component::Crane => "crane",
        }
    }

    /// Looks a component up by its binary name.
    pub fn from_name(name: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The module the component is built from.
    pub fn module(self) -> Module {
        match self {
            Component::KubeApiserver
            | Component::KubeControllerManager
            | Component::KubeScheduler
            | Component::Kubelet
            | Component::KubeProxy
            | Component::Kubectl => Module::Kubernetes,
            Component::KonnectivityServer | Component::KonnectivityAgent => Module::Konnectivity,
            Component::Etcd => Module::EtcdServer,
            Component::Etcdctl => Module::Etcdctl,
            Component::Kine => Module::Kine,
            Component::Containerd | Component::ContainerdShimRuncV2 | Component::Ctr => {
                Module::Containerd
            }
            Component::Runc => Module::Runc,
            Component::CniBridge
            | Component::CniHostLocal
            | Component::CniLoopback
            | Component::CniPortmap => Module::CniPlugins,
            Component::Coredns => Module::Coredns,
            Component::Registry => Module::Distribution,
            Component::Crane => Module::Crane,
        }
    }

    /// The Go package (a `main`) to build.
    pub fn package(self) -> String {
        let module = self.module().path();
        match self {
            Component::KonnectivityServer => format!("{module}/cmd/server"),
            Component::KonnectivityAgent => format!("{module}/cmd/agent"),
            Component::Etcd
            | Component::Etcdctl
            | Component::Kine
            | Component::Runc
            | Component::Coredns => module.to_string(),
            Component::CniBridge | Component::CniLoopback => {
                format!("{module}/plugins/main/{}", self.name())
            }
            Component::CniHostLocal => format!("{module}/plugins/ipam/host-local"),
            Component::CniPortmap => format!("{module}/plugins/meta/portmap"),
            _ => format!("{module}/cmd/{}", self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_parsing() {
        let cases = [
            ("v1.36.3", Some(36)),
            ("v1.35.0", Some(35)),
            ("v0.36.0", Some(36)),
            ("1.36.3", None),
            ("v1.36", None),
            ("v1.36.3.1", None),
            ("v1.x.3", None),
            ("v1..3", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(minor_of(input).ok(), want, "{input}");
        }
    }

    #[test]
    fn konnectivity_follows_kubernetes_minor() {
        let pins = Pins::default();
        let v = |k: &str| pins.version_for(Component::KonnectivityServer, k).ok();
        assert_eq!(v("v1.36.3").as_deref(), Some("v0.36.0"));
        assert_eq!(v("v1.35.4").as_deref(), Some("v0.34.0"));
        assert_eq!(v("v1.20.0"), None);
        assert_eq!(
            pins.version_for(Component::Etcd, "v1.35.4").unwrap(),
            pins.etcd
        );
    }

    #[test]
    fn packages_and_names() {
        assert_eq!(
            Component::Kubelet.package(),
            "k8s.io/kubernetes/cmd/kubelet"
        );
        assert_eq!(
            Component::KonnectivityAgent.package(),
            "sigs.k8s.io/apiserver-network-proxy/cmd/agent"
        );
        assert_eq!(Component::Etcd.package(), "go.etcd.io/etcd/server/v3");
        assert_eq!(
            Component::ContainerdShimRuncV2.package(),
            "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
        );
        assert_eq!(
            Component::CniHostLocal.package(),
            "github.com/containernetworking/plugins/plugins/ipam/host-local"
        );
        assert_eq!(Component::Runc.package(), "github.com/opencontainers/runc");
        assert_eq!(
            Component::Registry.package(),
            "github.com/distribution/distribution/v3/cmd/registry"
        );
        for c in Component::ALL {
            assert_eq!(Component::from_name(c.name()), Some(c));
        }
        assert_eq!(Module::Kubernetes.sibling_version("v1.36.3"), "v0.36.3");
        assert_eq!(Module::EtcdServer.sibling_version("v3.6.16"), "v3.6.16");
    }

    #[test]
    fn kubernetes_ldflags_stamp_version() {
        let f = Module::Kubernetes.ldflags("v1.36.3").unwrap();
        assert!(f.contains("k8s.io/component-base/version.gitVersion=v1.36.3"));
        assert!(f.contains("k8s.io/component-base/version.gitMinor=36"));
        assert!(Module::Kubernetes.ldflags("bogus").is_err());
    }
}
