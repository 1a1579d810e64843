//! The Machine objects as the machine API reads and writes them: which Machine an enrolling
//! node is, whether its token may have it, creating it, recording its certificate and
//! reports, and the desired config. The decisions are pure functions ([`bind`],
//! [`may_bind`], [`phase_after_enrollment`], [`phase_after_report`], [`desired`]); the rest
//! is one API call each. Writes that replace what another writer may change at the same
//! time (the certificate record, the conditions) carry the `resourceVersion` they were
//! computed from and report a conflict instead of losing an update.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions,
};
use serde_json::json;
use std::net::IpAddr;
use tether_api::machine::{AGENT_REACHABLE, Facts, MAC_LABEL, MachineCertificate, UUID_LABEL};

use tether_api::machine_api::{DesiredConfig, Join};
use tether_api::token::{TokenKind, TokenRecord};
use tether_api::{Machine, MachinePhase, MachineSpec};
use tether_boot::{Mac, Uuid};
use time::OffsetDateTime;

use crate::error::Error;
use crate::kube::{condition, merge_conditions, rfc3339};

/// Which Machine a node is, given the Machines carrying its boot MAC and the never-enrolled
/// ones carrying its UUID: the MAC decides (first by name, as tether-pxe picks); the UUID
/// only when it names exactly one Machine (firmware that repeats UUIDs across boards
/// exists, and placeholders never get this far); else a new Machine named after the MAC.
pub fn bind(mac: Mac, by_mac: &[String], by_uuid: &[String]) -> String {
    if let Some(m) = tether_api::machine::owner_of_mac(by_mac.iter().cloned()) {
        return m;
    }
    if let [only] = by_uuid {
        return only.clone();
    }
    mac.machine_name()
}

/// Whether `token` may enroll a node as the existing Machine `m`. A Machine nobody enrolled
/// and no pool claimed is anyone's with a valid token. Otherwise only a **boot** token —
/// minted by tether-pxe for this MAC after it saw the MAC on its segment: the diskless
/// machine rebooting — or a join token **of the Machine's own pool** may take it over; any
/// other token would hand one machine's identity (and later its tenant's config) to
/// whoever claims its MAC.
pub fn may_bind(m: &Machine, token: &TokenRecord) -> Result<(), String> {
    let enrolled = m.status.as_ref().is_some_and(|s| s.certificate.is_some());
    let pool = m.spec.pool.as_deref();
    if !enrolled && pool.is_none() {
        return Ok(());
    }
    match (token.kind, pool, token.pool.as_deref()) {
        (TokenKind::Boot, _, _) => Ok(()),
        (TokenKind::Join, Some(p), Some(t)) if p == t => Ok(()),
        _ => Err(format!(
            "Machine {} is {} already; token {} may not take it over (its boot token, or a join token of its pool, may)",
            m.name_any(),
            match pool {
                Some(p) => format!("in pool {p}"),
                None => "enrolled".into(),
            },
            token.id
        )),
    }
}

/// The phase after a successful enrollment: a Machine that was only discovered (or given
/// back) is now Enrolled; one that is further along (a diskless node re-enrolling after a
/// reboot) keeps its phase for its controllers to judge.
pub fn phase_after_enrollment(current: Option<MachinePhase>) -> MachinePhase {
    match current {
        None | Some(MachinePhase::Discovered) | Some(MachinePhase::Released) => {
            MachinePhase::Enrolled
        }
        Some(p) => p,
    }
}

/// The phase after an agent report. The agent confirms `Enrolled` (of a Machine that is
/// Discovered) and, while a pool holds the machine, moves it through Installing, Joining and
/// Ready as it gets there; a claim, a release or a failure are the controllers' to set.
pub fn phase_after_report(current: MachinePhase, reported: Option<MachinePhase>) -> MachinePhase {
    use MachinePhase::*;
    match (current, reported) {
        (Discovered, Some(Enrolled)) => Enrolled,
        (
            Assigned | Installing | Joining | Ready | Failed,
            Some(p @ (Installing | Joining | Ready)),
        ) => p,
        (Installing | Joining | Ready, Some(Failed)) => Failed,
        (c, _) => c,
    }
}

/// Whether a Machine's desired config carries its join: a pool holds it and has not
/// released it.
pub fn serves_join(m: &Machine) -> bool {
    m.spec.pool.is_some() && m.status.as_ref().map(|s| s.phase) != Some(MachinePhase::Released)
}

/// The desired config of a Machine with the join its pool rendered (ignored unless
/// [`serves_join`]), versioned by its content.
pub fn desired(m: &Machine, report_seconds: u32, join: Option<Join>) -> DesiredConfig {
    DesiredConfig {
        version: String::new(),
        machine: m.name_any(),
        phase: m.status.as_ref().map(|s| s.phase).unwrap_or_default(),
        pool: m.spec.pool.clone(),
        image: m.spec.image.clone(),
        report_seconds,
        join: join.filter(|_| serves_join(m)),
    }
    .versioned()
}

/// The node IP of a machine seen at `remote`: `remote` itself when it is one of the
/// machine's own addresses (not a NAT's); else the first IPv4 address of the NIC it booted
/// from; else none (the kubelet picks).
pub fn node_ip(remote: Option<IpAddr>, facts: Option<&Facts>) -> Option<String> {
    let facts = facts?;
    let addrs = |n: &tether_api::machine::Nic| -> Vec<IpAddr> {
        n.addresses
            .iter()
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect()
    };
    if let Some(r) = remote.map(|r| r.to_canonical())
        && facts.nics.iter().any(|n| addrs(n).contains(&r))
    {
        return Some(r.to_string());
    }
    let boot = facts.boot_mac.as_deref()?;
    facts
        .nics
        .iter()
        .find(|n| n.mac.eq_ignore_ascii_case(boot))
        .and_then(|n| addrs(n).into_iter().find(|a| a.is_ipv4()))
        .map(|a| a.to_string())
}

/// Machine reads and writes.
#[derive(Clone)]
pub struct Inventory {
    api: Api<Machine>,
}

/// The outcome of a write that carries a `resourceVersion`.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// Done.
    Yes,
    /// The Machine changed since it was read: read again and recompute.
    Conflict,
}

impl Inventory {
    /// Machines of the cluster of `client`.
    pub fn new(client: kube::Client) -> Inventory {
        Inventory {
            api: Api::all(client),
        }
    }

    /// A Machine by name.
    pub async fn get(&self, name: &str) -> Result<Option<Machine>, Error> {
        self.api
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("get Machine {name}")))
    }

    async fn with_label(&self, label: &str, value: &str) -> Result<Vec<Machine>, Error> {
        let lp = ListParams::default().labels(&format!("{label}={value}"));
        Ok(self
            .api
            .list(&lp)
            .await
            .map_err(Error::kube(format!("list Machines with {label}={value}")))?
            .items)
    }

    /// The Machine a node with `mac` and `uuid` is ([`bind`]).
    pub async fn bind(&self, mac: Mac, uuid: Option<&Uuid>) -> Result<String, Error> {
        let by_mac: Vec<String> = self
            .with_label(MAC_LABEL, &mac.dashed())
            .await?
            .iter()
            .map(|m| m.name_any())
            .collect();
        let by_uuid: Vec<String> = match uuid {
            Some(u) if by_mac.is_empty() => self
                .with_label(UUID_LABEL, u.as_str())
                .await?
                .iter()
                .filter(|m| m.status.as_ref().is_none_or(|s| s.certificate.is_none()))
                .map(|m| m.name_any())
                .collect(),
            _ => Vec::new(),
        };
        Ok(bind(mac, &by_mac, &by_uuid))
    }

    /// Creates Machine `name` for a node with `mac` and `facts`, with the token's pool and
    /// labels; `Ok(None)` if it exists already (made a moment ago by tether-pxe or a retry).
    pub async fn create(
        &self,
        name: &str,
        mac: Mac,
        uuid: Option<&Uuid>,
        facts: &Facts,
        token: &TokenRecord,
    ) -> Result<Option<Machine>, Error> {
        let mut labels: BTreeMap<String, String> = token.labels.clone();
        labels.insert(MAC_LABEL.into(), mac.dashed());
        if let Some(u) = uuid {
            labels.insert(UUID_LABEL.into(), u.to_string());
        }
        let mut macs: Vec<String> = facts.nics.iter().map(|n| n.mac.clone()).collect();
        if !macs.contains(&mac.to_string()) {
            macs.insert(0, mac.to_string());
        }
        let machine = Machine {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: MachineSpec {
                macs,
                uuid: uuid.map(|u| u.to_string()),
                labels: BTreeMap::new(),
                pool: token.pool.clone(),
                image: None,
            },
            status: None,
        };
        let pp = PostParams {
            field_manager: Some(super::MANAGER.into()),
            ..Default::default()
        };
        match self.api.create(&pp, &machine).await {
            Ok(m) => {
                tracing::info!(machine = name, %mac, "created Machine at enrollment");
                Ok(Some(m))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(Error::kube(format!("create Machine {name}"))(e)),
        }
    }

    /// Gives an unclaimed Machine the token's pool and labels (a join token pre-assigns).
    pub async fn adopt(&self, m: &Machine, token: &TokenRecord) -> Result<(), Error> {
        if m.spec.pool.is_some() || (token.pool.is_none() && token.labels.is_empty()) {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"labels": token.labels},
            "spec": {"pool": token.pool},
        });
        self.api
            .patch(
                &m.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(Error::kube(format!("assign Machine {}", m.name_any())))?;
        Ok(())
    }

    /// Deletes the Machine this enrollment created, when the enrollment was refused after
    /// all (a refusal leaves nothing behind); only that very object, only while unenrolled.
    pub async fn undo_create(&self, m: &Machine) {
        if m.status.as_ref().is_some_and(|s| s.certificate.is_some()) {
            return;
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: m.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        if let Err(e) = self.api.delete(&m.name_any(), &dp).await {
            tracing::warn!(machine = %m.name_any(), "remove the Machine of a refused enrollment: {e}");
        }
    }

    /// Records an enrollment of `m` (as read): phase, facts, the certificate, the sighting.
    pub async fn record_enrollment(
        &self,
        m: &Machine,
        facts: &Facts,
        cert: &MachineCertificate,
        now: OffsetDateTime,
    ) -> Result<Written, Error> {
        let status = m.status.clone().unwrap_or_default();
        let conditions = merge_conditions(
            &status.conditions,
            vec![condition(
                AGENT_REACHABLE,
                true,
                "Enrolled",
                "the agent enrolled",
                None,
            )],
        );
        let patch = json!({"status": {
            "phase": phase_after_enrollment(m.status.as_ref().map(|s| s.phase)),
            "facts": facts,
            "certificate": cert,
            "lastSeen": rfc3339(now),
            "conditions": conditions,
        }});
        self.patch_status_at(m, patch).await
    }

    /// A merge patch of the status of `m`, valid only if `m` is still what was read.
    pub async fn patch_status_at(
        &self,
        m: &Machine,
        mut patch: serde_json::Value,
    ) -> Result<Written, Error> {
        patch["metadata"] = json!({"resourceVersion": m.metadata.resource_version});
        match self
            .api
            .patch_status(
                &m.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(Written::Yes),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Written::Conflict),
            Err(e) => Err(Error::kube(format!(
                "update the status of Machine {}",
                m.name_any()
            ))(e)),
        }
    }

    /// Merge-patches Machine `m` itself (spec, labels, annotations) if it is still at the
    /// `resourceVersion` it was read at: a claim that lost a race reports a conflict.
    pub async fn patch_at(
        &self,
        m: &Machine,
        mut patch: serde_json::Value,
    ) -> Result<Written, Error> {
        patch["metadata"]["resourceVersion"] = json!(m.metadata.resource_version);
        match self
            .api
            .patch(
                &m.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(Written::Yes),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Written::Conflict),
            Err(e) => Err(Error::kube(format!("update Machine {}", m.name_any()))(e)),
        }
    }

    /// Every Machine (for the reachability sweep).
    pub async fn list(&self) -> Result<Vec<Machine>, Error> {
        Ok(self
            .api
            .list(&ListParams::default())
            .await
            .map_err(Error::kube("list Machines"))?
            .items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::MachineStatus;

    fn mac() -> Mac {
        "52:54:00:00:00:07".parse().unwrap()
    }

    #[test]
    fn binding() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let cases: &[(&[&str], &[&str], &str)] = &[
            (&[], &[], "mac-525400000007"),
            (&["rack1-n3"], &[], "rack1-n3"),
            (&["z", "a"], &["u"], "a"),
            (&[], &["by-uuid"], "by-uuid"),
            (&[], &["u1", "u2"], "mac-525400000007"),
        ];
        for (by_mac, by_uuid, want) in cases {
            assert_eq!(
                bind(mac(), &s(by_mac), &s(by_uuid)),
                *want,
                "{by_mac:?} {by_uuid:?}"
            );
        }
    }

    #[test]
    fn who_may_take_an_existing_machine() {
        let t = tether_boot::Token::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let hour = time::Duration::hours(1);
        let boot = TokenRecord::boot(&t, mac(), now, hour);
        let join = |pool: Option<&str>| {
            TokenRecord::join(&t, now, hour, None, pool.map(String::from), BTreeMap::new())
        };
        let machine = |enrolled: bool, pool: Option<&str>| {
            let mut m = Machine::new(
                "m",
                MachineSpec {
                    pool: pool.map(String::from),
                    ..Default::default()
                },
            );
            m.status = Some(MachineStatus {
                certificate: enrolled.then(MachineCertificate::default),
                ..Default::default()
            });
            m
        };
        let cases = [
            ("free, join", machine(false, None), join(None), true),
            ("free, boot", machine(false, None), boot.clone(), true),
            (
                "enrolled, pool-less join",
                machine(true, None),
                join(None),
                false,
            ),
            (
                "enrolled, another pool's join",
                machine(true, Some("a/x")),
                join(Some("b/y")),
                false,
            ),
            (
                "enrolled, its pool's join",
                machine(true, Some("a/x")),
                join(Some("a/x")),
                true,
            ),
            (
                "pooled, unenrolled, pool-less join",
                machine(false, Some("a/x")),
                join(None),
                false,
            ),
            (
                "enrolled, boot token",
                machine(true, Some("a/x")),
                boot,
                true,
            ),
        ];
        for (name, m, tok, ok) in cases {
            assert_eq!(may_bind(&m, &tok).is_ok(), ok, "{name}");
        }
        let err = may_bind(&machine(true, Some("a/x")), &join(None)).unwrap_err();
        assert!(
            err.contains("in pool a/x") && !err.contains(&t.to_string()),
            "{err}"
        );
    }

    #[test]
    fn phases() {
        use MachinePhase::*;
        let cases = [
            (None, Enrolled),
            (Some(Discovered), Enrolled),
            (Some(Released), Enrolled),
            (Some(Enrolled), Enrolled),
            (Some(Ready), Ready),
            (Some(Assigned), Assigned),
        ];
        for (cur, want) in cases {
            assert_eq!(phase_after_enrollment(cur), want, "{cur:?}");
        }
        assert_eq!(phase_after_report(Discovered, Some(Enrolled)), Enrolled);
        assert_eq!(phase_after_report(Assigned, Some(Enrolled)), Assigned);
        assert_eq!(phase_after_report(Enrolled, Some(Ready)), Enrolled);
        assert_eq!(phase_after_report(Enrolled, None), Enrolled);
        assert_eq!(phase_after_report(Assigned, Some(Installing)), Installing);
        assert_eq!(phase_after_report(Installing, Some(Joining)), Joining);
        assert_eq!(phase_after_report(Joining, Some(Ready)), Ready);
        assert_eq!(phase_after_report(Ready, Some(Joining)), Joining);
        assert_eq!(phase_after_report(Installing, Some(Failed)), Failed);
        assert_eq!(phase_after_report(Failed, Some(Installing)), Installing);
        assert_eq!(
            phase_after_report(Released, Some(Ready)),
            Released,
            "a release is the controller's"
        );
        assert_eq!(phase_after_report(Enrolled, Some(Failed)), Enrolled);
    }

    #[test]
    fn node_ips_are_the_machines_own() {
        let facts = Facts {
            boot_mac: Some("52:54:00:00:00:01".into()),
            nics: vec![
                tether_api::machine::Nic {
                    name: "eth0".into(),
                    mac: "52:54:00:00:00:01".into(),
                    addresses: vec!["fd00::7/64".into(), "10.0.0.7/24".into()],
                },
                tether_api::machine::Nic {
                    name: "eth1".into(),
                    mac: "52:54:00:00:00:02".into(),
                    addresses: vec!["192.168.1.7/24".into()],
                },
            ],
            ..Default::default()
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            node_ip(ip("192.168.1.7"), Some(&facts)).as_deref(),
            Some("192.168.1.7")
        );
        assert_eq!(
            node_ip(ip("::ffff:10.0.0.7"), Some(&facts)).as_deref(),
            Some("10.0.0.7")
        );
        assert_eq!(
            node_ip(ip("203.0.113.9"), Some(&facts)).as_deref(),
            Some("10.0.0.7"),
            "behind NAT: the boot NIC's IPv4"
        );
        assert_eq!(node_ip(None, Some(&facts)).as_deref(), Some("10.0.0.7"));
        assert_eq!(node_ip(ip("10.0.0.7"), None), None);
    }
}
