//! host-gw: a route to every other Node's pod CIDR through that Node's IP on the shared
//! segment, from the desired config. The agent's routes carry their own protocol number
//! ([`PROTO`]), so it lists, replaces and deletes exactly its own and never a route someone
//! else made. The diff is pure ([`diff`]); the edge runs iproute2's `ip` (the image has it;
//! a netlink crate would add a dependency for three calls — docs/decisions.md).

use tether_api::machine_api::PodRoute;

use crate::error::{Error, Result};

/// The routing protocol number on the agent's routes (unassigned in `rtnetlink(7)`'s
/// table; `ip route show proto 77`).
pub const PROTO: &str = "77";

/// What to change: routes to add or repoint, and pod CIDRs whose route must go.
pub fn diff(current: &[PodRoute], want: &[PodRoute]) -> (Vec<PodRoute>, Vec<String>) {
    let add = want
        .iter()
        .filter(|w| !current.contains(w))
        .cloned()
        .collect();
    let del = current
        .iter()
        .filter(|c| !want.iter().any(|w| w.cidr == c.cidr))
        .map(|c| c.cidr.clone())
        .collect();
    (add, del)
}

/// The agent's routes in `ip -j route show proto 77` output.
pub fn parse(json: &[u8]) -> Result<Vec<PodRoute>> {
    #[derive(serde::Deserialize)]
    struct R {
        dst: String,
        gateway: Option<String>,
    }
    let rs: Vec<R> = serde_json::from_slice(json).map_err(|e| Error::BadInput {
        source_name: "ip -j route".into(),
        detail: e.to_string(),
    })?;
    Ok(rs
        .into_iter()
        .filter_map(|r| {
            Some(PodRoute {
                cidr: r.dst,
                via: r.gateway?,
            })
        })
        .collect())
}

async fn ip(args: &[&str]) -> Result<Vec<u8>> {
    super::run(std::path::Path::new("ip"), args).await
}

/// Makes the node's routes `want`; returns how many changed.
pub async fn converge(want: &[PodRoute]) -> Result<usize> {
    let current = parse(&ip(&["-j", "route", "show", "proto", PROTO]).await?)?;
    let (add, del) = diff(&current, want);
    for cidr in &del {
        ip(&["route", "del", cidr, "proto", PROTO]).await?;
        tracing::info!(%cidr, "pod route removed");
    }
    for r in &add {
        ip(&["route", "replace", &r.cidr, "via", &r.via, "proto", PROTO]).await?;
        tracing::info!(cidr = %r.cidr, via = %r.via, "pod route");
    }
    Ok(add.len() + del.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cidr: &str, via: &str) -> PodRoute {
        PodRoute {
            cidr: cidr.into(),
            via: via.into(),
        }
    }

    #[test]
    fn diffs() {
        let cur = [
            r("10.244.1.0/24", "10.0.0.8"),
            r("10.244.2.0/24", "10.0.0.9"),
        ];
        let want = [
            r("10.244.1.0/24", "10.0.0.18"),
            r("10.244.3.0/24", "10.0.0.10"),
        ];
        let (add, del) = diff(&cur, &want);
        assert_eq!(add, want, "a moved node is repointed, a new one added");
        assert_eq!(del, ["10.244.2.0/24"]);
        assert_eq!(diff(&want, &want), (vec![], vec![]));
        assert_eq!(diff(&cur, &[]).1.len(), 2);
    }

    #[test]
    fn parses_ip_json() {
        let out = br#"[{"dst":"10.244.1.0/24","gateway":"10.0.0.8","dev":"host0","protocol":"77","flags":[]},{"dst":"10.9.0.0/16","dev":"x","flags":[]}]"#;
        assert_eq!(parse(out).unwrap(), [r("10.244.1.0/24", "10.0.0.8")]);
        assert_eq!(parse(b"[]").unwrap(), []);
        assert!(parse(b"not json").is_err());
    }
}
