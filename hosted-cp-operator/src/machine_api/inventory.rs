//! The Machine objects as the machine API reads and writes them: which Machine an enrolling
//! node is, creating it, recording its certificate and reports, and the desired config.
//! The decisions are pure functions ([`bind`], [`phase_after_enrollment`],
//! [`phase_after_report`], [`desired`]); the rest is one API call each.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_api::machine::{AGENT_REACHABLE, Facts, MAC_LABEL, MachineCertificate, UUID_LABEL};
use tether_api::machine_api::DesiredConfig;
use tether_api::token::TokenRecord;
use tether_api::{Machine, MachinePhase, MachineSpec};
use tether_boot::Mac;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::Error;
use crate::kube::{condition, merge_conditions};

/// RFC 3339 of `t`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Which Machine a node is, given the Machines carrying its boot MAC and those carrying
/// its UUID: the MAC decides (first by name, as tether-pxe picks); the UUID only when it
/// names exactly one Machine (firmware that repeats UUIDs across boards exists); else a new
/// Machine named after the MAC.
pub fn bind(mac: Mac, by_mac: &[String], by_uuid: &[String]) -> String {
    if let Some(m) = by_mac.iter().min() {
        return m.clone();
    }
    if let [only] = by_uuid {
        return only.clone();
    }
    mac.machine_name()
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

/// The phase after an agent report: for now the agent only confirms `Enrolled` (of a
/// Machine that is Discovered); later phases belong to the pool controllers.
pub fn phase_after_report(current: MachinePhase, reported: Option<MachinePhase>) -> MachinePhase {
    match (current, reported) {
        (MachinePhase::Discovered, Some(MachinePhase::Enrolled)) => MachinePhase::Enrolled,
        (c, _) => c,
    }
}

/// The desired config of a Machine.
pub fn desired(m: &Machine, report_seconds: u32) -> DesiredConfig {
    DesiredConfig {
        generation: m.metadata.generation.unwrap_or(1),
        machine: m.name_any(),
        phase: m.status.as_ref().map(|s| s.phase).unwrap_or_default(),
        pool: m.spec.pool.clone(),
        image: m.spec.image.clone(),
        report_seconds,
    }
}

/// Machine reads and writes.
#[derive(Clone)]
pub struct Inventory {
    api: Api<Machine>,
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

    async fn names_with(&self, label: &str, value: &str) -> Result<Vec<String>, Error> {
        let lp = ListParams::default().labels(&format!("{label}={value}"));
        Ok(self
            .api
            .list(&lp)
            .await
            .map_err(Error::kube(format!("list Machines with {label}={value}")))?
            .items
            .iter()
            .map(|m| m.name_any())
            .collect())
    }

    /// The Machine a node with `mac` and `uuid` is ([`bind`]).
    pub async fn bind(&self, mac: Mac, uuid: Option<&str>) -> Result<String, Error> {
        let by_mac = self.names_with(MAC_LABEL, &mac.dashed()).await?;
        let by_uuid = match uuid {
            Some(u) if by_mac.is_empty() => self.names_with(UUID_LABEL, u).await?,
            _ => Vec::new(),
        };
        Ok(bind(mac, &by_mac, &by_uuid))
    }

    /// The Machine `name`, created if missing with the node's MAC, UUID and the token's pool
    /// and labels. An existing Machine keeps its own labels and pool.
    pub async fn ensure(
        &self,
        name: &str,
        mac: Mac,
        facts: &Facts,
        token: &TokenRecord,
    ) -> Result<Machine, Error> {
        if let Some(m) = self.get(name).await? {
            return Ok(m);
        }
        let mut labels: BTreeMap<String, String> = token.labels.clone();
        labels.insert(MAC_LABEL.into(), mac.dashed());
        if let Some(u) = &facts.uuid {
            labels.insert(UUID_LABEL.into(), u.clone());
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
                uuid: facts.uuid.clone(),
                labels: token.labels.clone(),
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
                Ok(m)
            }
            // tether-pxe (or a parallel retry) made it a moment ago.
            Err(kube::Error::Api(e)) if e.code == 409 => self
                .get(name)
                .await?
                .ok_or_else(|| Error::Invalid(format!("Machine {name} vanished while enrolling"))),
            Err(e) => Err(Error::kube(format!("create Machine {name}"))(e)),
        }
    }

    /// Records an enrollment: phase, facts, the certificate (the one it replaces stays
    /// accepted until the new one is used), and the first sighting.
    pub async fn record_enrollment(
        &self,
        m: &Machine,
        facts: &Facts,
        cert: MachineCertificate,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
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
        self.patch_status(&m.name_any(), &patch).await
    }

    /// Replaces the certificate record, failing with `Ok(false)` if the Machine changed since
    /// `m` was read (two renewals racing: the caller reads again).
    pub async fn record_certificate(
        &self,
        m: &Machine,
        cert: &MachineCertificate,
    ) -> Result<bool, Error> {
        let patch = json!({
            "metadata": {"resourceVersion": m.metadata.resource_version},
            "status": {"certificate": cert},
        });
        match self
            .api
            .patch_status(
                &m.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(Error::kube(format!(
                "record the certificate of Machine {}",
                m.name_any()
            ))(e)),
        }
    }

    /// A merge patch of the status subresource.
    pub async fn patch_status(&self, name: &str, patch: &serde_json::Value) -> Result<(), Error> {
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(Error::kube(format!("update the status of Machine {name}")))?;
        Ok(())
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
    }
}
