//! The konnectivity agent, inside tether-agent: the tenant's kube-apiserver reaches this node
//! (kubelet logs/exec/port-forward, webhooks and aggregated APIs in pods) through
//! konnectivity-server, and this module holds the agent end of those tunnels, so they are up
//! without any pod on the node.
//!
//! Pure parts with table tests: [`allow`] (what a dial may reach), [`session`] (one stream's
//! packet rules), the decisions in [`clientset`]. Edges: [`stream`] (one gRPC stream and its
//! TCP connections) and [`run`] (the streams to every server). The wire format is upstream's
//! (apiserver-network-proxy v0.36.0), generated from the vendored protos into [`proto`].

pub mod allow;
pub mod clientset;
pub mod desired;
pub mod proto;
pub mod session;
pub mod stream;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use tokio::sync::watch;

pub use allow::{Allow, Reason, Refusal};

/// Where the tunnel goes and who this node says it is.
#[derive(Clone, PartialEq)]
pub struct Settings {
    /// The konnectivity-server agent endpoint, `host:port` (`[v6]:port`); the host may be an
    /// IP address. A load balancer in front of several servers is expected.
    pub server: String,
    /// PEM roots for the server's certificate (the tenant CA).
    pub ca_pem: String,
    /// Bearer token (a ServiceAccount token), sent at every Connect.
    pub token: String,
    /// The `agentID` header (the node name).
    pub agent_id: String,
    /// `agentIdentifiers` `host=` (what destHost routing matches a dial's host against).
    pub node_name: String,
    /// `agentIdentifiers` `ipv4=` / `ipv6=`.
    pub node_ip: Option<IpAddr>,
    /// What dials may reach.
    pub allow: Allow,
}

impl Settings {
    /// Whether streams made with `self` stay right under `other`: everything but the token
    /// matters, since the server checks the token only at Connect.
    pub fn same_streams(&self, other: &Settings) -> bool {
        let Settings {
            server,
            ca_pem,
            token: _,
            agent_id,
            node_name,
            node_ip,
            allow,
        } = self;
        *server == other.server
            && *ca_pem == other.ca_pem
            && *agent_id == other.agent_id
            && *node_name == other.node_name
            && *node_ip == other.node_ip
            && *allow == other.allow
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("server", &self.server)
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field(
                "token",
                &format_args!(
                    "<{}>",
                    if self.token.is_empty() {
                        "none"
                    } else {
                        "redacted"
                    }
                ),
            )
            .field("agent_id", &self.agent_id)
            .field("node_name", &self.node_name)
            .field("node_ip", &self.node_ip)
            .field("allow", &self.allow)
            .finish()
    }
}

/// What the tunnel holds, for status reports and readiness.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    /// The serverIDs this agent holds a stream to.
    pub servers: BTreeSet<String>,
    /// How many servers there are, by the last `serverCount` header (0 before any).
    pub server_count: usize,
    /// The last connect or stream error, cleared by the next successful connect.
    pub last_error: Option<String>,
    /// Whether the agent is draining (DRAIN sent, no new streams).
    pub draining: bool,
    /// Streams that have queued their `DRAIN` (refreshed every 100 ms while draining).
    pub drained: usize,
    /// Remote connections open through the tunnel (refreshed every 100 ms while draining;
    /// a sample otherwise).
    pub open_connections: usize,
}

/// Runs until `settings`' sender is dropped. `None` settings: hold no streams. A change of
/// server, CA, identity or allow-list closes all streams and reconnects; a change of only the
/// token is used from the next Connect on (streams stay). `drain` turning true sends one
/// DRAIN per stream and opens no new streams; existing ones keep serving.
pub async fn run(
    settings: watch::Receiver<Option<Settings>>,
    status: watch::Sender<Status>,
    drain: watch::Receiver<bool>,
) {
    clientset::run(settings, status, drain).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            server: "10.0.0.1:8132".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----".into(),
            token: "secret-token".into(),
            agent_id: "node-1".into(),
            node_name: "node-1".into(),
            node_ip: Some("10.0.0.5".parse().unwrap()),
            allow: Allow {
                node_ips: vec!["10.0.0.5".parse().unwrap()],
                node_names: vec!["node-1".into()],
                kubelet_port: 10250,
                cidrs: vec![],
            },
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let shown = format!("{:?}", settings());
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        assert!(shown.contains("10.0.0.1:8132"), "{shown}");
    }

    #[test]
    fn only_a_token_change_keeps_streams() {
        let base = settings();
        let token = Settings {
            token: "new".into(),
            ..base.clone()
        };
        assert!(base.same_streams(&token));
        let changes = [
            Settings {
                server: "10.0.0.2:8132".into(),
                ..base.clone()
            },
            Settings {
                ca_pem: "other".into(),
                ..base.clone()
            },
            Settings {
                agent_id: "x".into(),
                ..base.clone()
            },
            Settings {
                node_name: "x".into(),
                ..base.clone()
            },
            Settings {
                node_ip: None,
                ..base.clone()
            },
            Settings {
                allow: Allow {
                    kubelet_port: 1,
                    ..base.allow.clone()
                },
                ..base.clone()
            },
        ];
        for changed in changes {
            assert!(!base.same_streams(&changed), "{changed:?}");
        }
    }
}
