//! Pod networking without an add-on: a bridge with host-local addresses from the Node's
//! `podCIDR` (and portmap for `hostPort`). Routes to other nodes' pod CIDRs (host-gw) are
//! the node's, not CNI's; a CNI add-on replaces all of it.

use serde_json::json;

/// The network's name (and the conflist's).
pub const NETWORK: &str = "tether";
/// The conflist's file name in the CNI configuration directory.
pub const FILE: &str = "10-tether.conflist";

/// The conflist for a node whose Node has `pod_cidr`.
pub fn bridge_conflist(pod_cidr: &str) -> String {
    let c = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    serde_json::to_string_pretty(&c).expect("serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_uses_the_pod_cidr() {
        let v: serde_json::Value = serde_json::from_str(&bridge_conflist("10.244.3.0/24")).unwrap();
        assert_eq!(v["name"], NETWORK);
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        assert_eq!(v["plugins"][1]["type"], "portmap");
    }
}
