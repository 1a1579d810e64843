//! The tunnel as the desired config asks for it ([`settings`]) and as the Machine's status
//! tells it ([`condition`]): pure, so the service only moves values between the two.

use std::net::IpAddr;

use tether_api::machine::TUNNEL_CONNECTED;
use tether_api::machine_api::Join;
use tether_api::tenant_control_plane::{Cidr, Condition};

use super::{Allow, Settings, Status};
use crate::node::kubelet;

/// The tunnel a join asks for: none without konnectivity in the tenant. The agent is the
/// node (`agentID` and `host=` are the Node's name, `ipv4=` its IP), and dials reach only
/// this node's kubelet and the tenant's pod and service networks.
pub fn settings(join: &Join) -> Option<Settings> {
    let t = join.tunnel.as_ref()?;
    let node_ip: Option<IpAddr> = join.node_ip.as_deref().and_then(|s| s.parse().ok());
    let cidrs = [&t.pod_cidr, &t.service_cidr]
        .into_iter()
        .filter_map(|c| Cidr::parse(c).ok())
        .collect();
    Some(Settings {
        server: t.server.clone(),
        ca_pem: join.ca.clone(),
        token: t.token.clone(),
        agent_id: join.node_name.clone(),
        node_name: join.node_name.clone(),
        node_ip,
        allow: Allow {
            node_ips: node_ip.into_iter().collect(),
            node_names: vec![join.node_name.clone()],
            kubelet_port: kubelet::PORT,
            cidrs,
        },
    })
}

/// `TunnelConnected` for the tunnel `wanted` (the settings the join gave, if any): True
/// while a stream to every server instance is held; False with `NoTunnel` when the desired
/// config asks for none (a free machine: the condition of an earlier tenant must not linger
/// on it), and with `NoNodeIP` when the join names no node IP (the API server dials kubelets
/// by their InternalIP, which this agent then neither announces nor accepts).
pub fn condition(wanted: Option<&Settings>, s: &Status) -> Condition {
    let held = s.servers.len();
    let (ok, reason) = if wanted.is_none() {
        (false, "NoTunnel")
    } else if wanted.is_some_and(|w| w.node_ip.is_none()) {
        (false, "NoNodeIP")
    } else if s.draining {
        (false, "Draining")
    } else if s.server_count > 0 && held >= s.server_count {
        (true, "Connected")
    } else if held > 0 {
        (false, "PartlyConnected")
    } else {
        (false, "NotConnected")
    };
    let mut message = if wanted.is_some() {
        format!("{held}/{} konnectivity servers", s.server_count.max(held))
    } else {
        "no tenant with konnectivity holds this machine".to_string()
    };
    if let (false, Some(e)) = (ok, &s.last_error) {
        message += &format!("; last error: {e}");
    }
    Condition {
        type_: TUNNEL_CONNECTED.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::machine_api::Tunnel;

    #[test]
    fn a_join_with_a_tunnel_gives_settings_for_this_node_only() {
        let mut join = Join {
            node_name: "m-1".into(),
            node_ip: Some("10.0.0.5".into()),
            ca: "CA".into(),
            ..Default::default()
        };
        assert_eq!(settings(&join), None, "no konnectivity, no tunnel");
        join.tunnel = Some(Tunnel {
            server: "10.0.0.1:8132".into(),
            token: "jwt".into(),
            token_expires: "2026-11-30T11:00:00Z".into(),
            pod_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.96.0.0/12".into(),
        });
        let s = settings(&join).unwrap();
        assert_eq!(
            (s.server.as_str(), s.token.as_str(), s.ca_pem.as_str()),
            ("10.0.0.1:8132", "jwt", "CA")
        );
        assert_eq!((s.agent_id.as_str(), s.node_name.as_str()), ("m-1", "m-1"));
        assert_eq!(s.node_ip, Some("10.0.0.5".parse().unwrap()));
        assert!(s.allow.check("10.0.0.5:10250").is_ok());
        assert!(s.allow.check("10.0.0.5:22").is_err());
        assert!(s.allow.check("10.244.3.7:8443").is_ok());
        assert!(s.allow.check("10.96.0.1:443").is_ok());
        assert!(s.allow.check("10.0.0.1:2379").is_err());
        join.node_ip = None;
        let s = settings(&join).unwrap();
        assert!(s.allow.node_ips.is_empty() && s.node_ip.is_none());
    }

    #[test]
    fn the_condition_is_true_only_with_every_server() {
        let with_ip = Settings {
            server: "10.0.0.1:8132".into(),
            ca_pem: "CA".into(),
            token: "jwt".into(),
            agent_id: "m-1".into(),
            node_name: "m-1".into(),
            node_ip: Some("10.0.0.5".parse().unwrap()),
            allow: Allow {
                node_ips: vec!["10.0.0.5".parse().unwrap()],
                node_names: vec!["m-1".into()],
                kubelet_port: kubelet::PORT,
                cidrs: vec![],
            },
        };
        let status = |held: &[&str], count, err: Option<&str>, draining| Status {
            servers: held.iter().map(|s| s.to_string()).collect(),
            server_count: count,
            last_error: err.map(str::to_string),
            draining,
            ..Default::default()
        };
        for (s, want, reason, message) in [
            (
                status(&[], 0, None, false),
                "False",
                "NotConnected",
                "0/0 konnectivity servers",
            ),
            (
                status(&[], 0, Some("connection refused"), false),
                "False",
                "NotConnected",
                "0/0 konnectivity servers; last error: connection refused",
            ),
            (
                status(&["a"], 2, None, false),
                "False",
                "PartlyConnected",
                "1/2 konnectivity servers",
            ),
            (
                status(&["a", "b"], 2, Some("old"), false),
                "True",
                "Connected",
                "2/2 konnectivity servers",
            ),
            (
                status(&["a"], 1, None, false),
                "True",
                "Connected",
                "1/1 konnectivity servers",
            ),
            (
                status(&["a"], 1, None, true),
                "False",
                "Draining",
                "1/1 konnectivity servers",
            ),
        ] {
            let c = condition(Some(&with_ip), &s);
            assert_eq!(
                (
                    c.type_.as_str(),
                    c.status.as_str(),
                    c.reason.as_str(),
                    c.message.as_str()
                ),
                (TUNNEL_CONNECTED, want, reason, message),
                "{s:?}"
            );
        }
        let c = condition(None, &status(&["a"], 1, None, false));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoTunnel")
        );
        let no_ip = Settings {
            node_ip: None,
            ..with_ip
        };
        let c = condition(Some(&no_ip), &status(&["a"], 1, None, false));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoNodeIP")
        );
    }
}
