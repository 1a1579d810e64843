//! What a `DIAL_REQ` may reach. konnectivity-server forwards whatever address the tenant's
//! kube-apiserver asks for, and a node sits on the management network too, so the agent
//! itself decides: this node's kubelet, or the tenant's pod and service networks — nothing
//! else. Host names are not resolved (a DNS answer must not widen the list); only this node's
//! own names are understood.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use tether_api::tenant_control_plane::Cidr;

/// The destinations the tunnel serves.
#[derive(Clone, Debug, PartialEq)]
pub struct Allow {
    /// This node's addresses: reachable only on `kubelet_port`.
    pub node_ips: Vec<IpAddr>,
    /// This node's names (case-insensitive): a dial to one means the first of `node_ips`.
    pub node_names: Vec<String>,
    /// The kubelet's port (10250).
    pub kubelet_port: u16,
    /// The tenant's pod and service networks: any port.
    pub cidrs: Vec<Cidr>,
}

/// Why a dial was refused; its `Display` is what the frontend receives in `DIAL_RSP.error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The address as requested.
    pub address: String,
    /// The rule that refused it.
    pub reason: Reason,
}

/// The rule behind a [`Refusal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not `HOST:PORT` (or port 0).
    Malformed,
    /// A name other than this node's.
    UnknownHost,
    /// This node's name, but no node address is known to dial.
    NoNodeAddress,
    /// This node, but not the kubelet's port.
    NodePort {
        /// The kubelet's port, the only one open.
        kubelet_port: u16,
    },
    /// Neither this node nor inside the tenant's networks.
    Outside,
    /// A protocol other than `tcp`.
    Protocol(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tether-agent: dial {} refused: ", self.address)?;
        match &self.reason {
            Reason::Malformed => write!(f, "not HOST:PORT with a port from 1 to 65535"),
            Reason::UnknownHost => write!(
                f,
                "host is not this node's name and not an IP address (names are not resolved)"
            ),
            Reason::NoNodeAddress => write!(f, "this node's address is not known"),
            Reason::NodePort { kubelet_port } => write!(
                f,
                "only the kubelet port {kubelet_port} is reachable on this node"
            ),
            Reason::Outside => write!(
                f,
                "not this node's kubelet port nor the tenant's pod/service networks"
            ),
            Reason::Protocol(p) => write!(f, "protocol {p:?} is not supported (only tcp)"),
        }
    }
}

impl Allow {
    /// Where to dial for `address` (`HOST:PORT`, `[V6]:PORT`), or why not.
    pub fn check(&self, address: &str) -> Result<SocketAddr, Refusal> {
        let refuse = |reason| Refusal {
            address: address.to_string(),
            reason,
        };
        let (host, port) = split_host_port(address).ok_or_else(|| refuse(Reason::Malformed))?;
        if port == 0 {
            return Err(refuse(Reason::Malformed));
        }
        let ip = match host.parse::<IpAddr>() {
            // `::ffff:10.0.0.1` is judged as `10.0.0.1`.
            Ok(ip) => ip.to_canonical(),
            Err(_) => {
                let name = host.trim_end_matches('.');
                if !self
                    .node_names
                    .iter()
                    .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
                {
                    return Err(refuse(Reason::UnknownHost));
                }
                *self
                    .node_ips
                    .first()
                    .ok_or_else(|| refuse(Reason::NoNodeAddress))?
            }
        };
        if self.node_ips.iter().any(|n| n.to_canonical() == ip) {
            return if port == self.kubelet_port {
                Ok(SocketAddr::new(ip, port))
            } else {
                Err(refuse(Reason::NodePort {
                    kubelet_port: self.kubelet_port,
                }))
            };
        }
        if self.cidrs.iter().any(|c| c.contains(ip)) {
            return Ok(SocketAddr::new(ip, port));
        }
        Err(refuse(Reason::Outside))
    }
}

/// `host:port` or `[v6]:port` → (host without brackets, port). An unbracketed IPv6 address is
/// ambiguous and refused, as Go's `net.SplitHostPort` does.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once(']')?;
        (host, port.strip_prefix(':')?)
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> Allow {
        Allow {
            node_ips: vec!["10.0.0.5".parse().unwrap(), "fd00:1::5".parse().unwrap()],
            node_names: vec!["Node-1".into(), "node-1.example.test".into()],
            kubelet_port: 10250,
            cidrs: vec![
                Cidr::parse("10.244.0.0/16").unwrap(),
                Cidr::parse("10.96.0.0/12").unwrap(),
                Cidr::parse("fd00:244::/64").unwrap(),
            ],
        }
    }

    #[test]
    fn check_table() {
        use Reason::*;
        let ok = |s: &str| Ok::<SocketAddr, Reason>(s.parse().unwrap());
        let cases: &[(&str, Result<SocketAddr, Reason>)] = &[
            // This node: the kubelet only.
            ("10.0.0.5:10250", ok("10.0.0.5:10250")),
            (
                "10.0.0.5:22",
                Err(NodePort {
                    kubelet_port: 10250,
                }),
            ),
            (
                "10.0.0.5:2379",
                Err(NodePort {
                    kubelet_port: 10250,
                }),
            ),
            ("[::ffff:10.0.0.5]:10250", ok("10.0.0.5:10250")),
            ("[fd00:1::5]:10250", ok("[fd00:1::5]:10250")),
            (
                "[fd00:1::5]:10255",
                Err(NodePort {
                    kubelet_port: 10250,
                }),
            ),
            // This node by name means its first address, still only the kubelet.
            ("node-1:10250", ok("10.0.0.5:10250")),
            ("NODE-1.:10250", ok("10.0.0.5:10250")),
            ("node-1.example.test:10250", ok("10.0.0.5:10250")),
            (
                "node-1:22",
                Err(NodePort {
                    kubelet_port: 10250,
                }),
            ),
            ("node-2:10250", Err(UnknownHost)),
            ("kubernetes.default.svc:443", Err(UnknownHost)),
            // The tenant's pod and service networks: any port.
            ("10.244.3.7:8443", ok("10.244.3.7:8443")),
            ("10.244.3.7:1", ok("10.244.3.7:1")),
            ("10.96.0.10:53", ok("10.96.0.10:53")),
            ("10.111.255.255:443", ok("10.111.255.255:443")),
            ("[fd00:244::1234]:9443", ok("[fd00:244::1234]:9443")),
            // Everything else.
            ("127.0.0.1:10250", Err(Outside)),
            ("[::1]:10250", Err(Outside)),
            ("10.0.0.1:2379", Err(Outside)),
            ("10.0.0.6:10250", Err(Outside)),
            ("192.168.1.1:443", Err(Outside)),
            ("169.254.169.254:80", Err(Outside)),
            ("10.112.0.0:443", Err(Outside)),
            ("0.0.0.0:10250", Err(Outside)),
            ("[fd00:245::1]:443", Err(Outside)),
            // Not an address.
            ("", Err(Malformed)),
            ("garbage", Err(Malformed)),
            ("10.244.0.1", Err(Malformed)),
            ("10.244.0.1:", Err(Malformed)),
            ("10.244.0.1:0", Err(Malformed)),
            ("10.244.0.1:65536", Err(Malformed)),
            ("10.244.0.1:+80", Err(Malformed)),
            (":80", Err(Malformed)),
            ("fd00:244::1:80", Err(Malformed)),
            ("[fd00:244::1]80", Err(Malformed)),
            ("[fd00:244::1:80", Err(Malformed)),
        ];
        let a = allow();
        for (address, want) in cases {
            let got = a.check(address).map_err(|r| {
                assert_eq!(r.address, *address);
                r.reason
            });
            assert_eq!(&got, want, "{address:?}");
        }
    }

    #[test]
    fn no_node_address() {
        let a = Allow {
            node_ips: vec![],
            ..allow()
        };
        assert_eq!(
            a.check("node-1:10250").unwrap_err().reason,
            Reason::NoNodeAddress
        );
    }

    #[test]
    fn refusal_messages_say_what_and_why() {
        let a = allow();
        assert_eq!(
            a.check("10.0.0.1:2379").unwrap_err().to_string(),
            "tether-agent: dial 10.0.0.1:2379 refused: not this node's kubelet port nor the \
             tenant's pod/service networks"
        );
        assert_eq!(
            a.check("10.0.0.5:22").unwrap_err().to_string(),
            "tether-agent: dial 10.0.0.5:22 refused: only the kubelet port 10250 is reachable \
             on this node"
        );
        assert_eq!(
            a.check("garbage").unwrap_err().to_string(),
            "tether-agent: dial garbage refused: not HOST:PORT with a port from 1 to 65535"
        );
    }
}
