//! `AgentReachable`: an enrolled Machine whose agent has not reported for three report
//! intervals gets `AgentReachable=False` (reason `NoRecentReport`); its next report sets it
//! back to True (the machine API does that). The sweep runs every report interval.

use std::time::Duration;

use kube::ResourceExt;
use serde_json::json;
use tether_api::Machine;
use tether_api::machine::AGENT_REACHABLE;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::kube::{condition, merge_conditions};
use crate::machine_api::inventory::Inventory;

/// Missed reports before a machine counts as unreachable.
pub const MISSED_REPORTS: u32 = 3;

/// Whether `m` must now be marked unreachable: enrolled (it has a certificate), silent for
/// longer than `timeout`, and not marked already.
pub fn goes_silent(m: &Machine, now: OffsetDateTime, timeout: Duration) -> Option<String> {
    let status = m.status.as_ref()?;
    status.certificate.as_ref()?;
    let already = status
        .conditions
        .iter()
        .any(|c| c.type_ == AGENT_REACHABLE && c.status == "False");
    if already {
        return None;
    }
    let last = status
        .last_seen
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())?;
    let silent = now - last;
    (silent > time::Duration::try_from(timeout).ok()?).then(|| {
        format!(
            "no report from the agent for {}s (it reports every {}s)",
            silent.whole_seconds(),
            timeout.as_secs() / u64::from(MISSED_REPORTS)
        )
    })
}

/// Runs the sweep forever.
pub async fn run(client: kube::Client, report_seconds: u32) {
    let every = Duration::from_secs(report_seconds.max(1).into());
    let timeout = every * MISSED_REPORTS;
    let inventory = Inventory::new(client);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let machines = match inventory.list().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("reachability sweep: {e}");
                continue;
            }
        };
        let now = OffsetDateTime::now_utc();
        for m in machines {
            let Some(why) = goes_silent(&m, now, timeout) else {
                continue;
            };
            tracing::warn!(machine = %m.name_any(), "{why}");
            let old = m
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let conditions = merge_conditions(
                &old,
                vec![condition(
                    AGENT_REACHABLE,
                    false,
                    "NoRecentReport",
                    &why,
                    None,
                )],
            );
            let patch = json!({"status": {"conditions": conditions}});
            // Written against what was read: a report that landed meanwhile wins (a
            // conflict), and the next sweep looks again.
            if let Err(e) = inventory.patch_status_at(&m, patch).await {
                tracing::debug!("reachability sweep: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::machine::MachineCertificate;
    use tether_api::{MachineSpec, MachineStatus};

    fn machine(last_seen: Option<&str>, enrolled: bool, marked: bool) -> Machine {
        let mut m = Machine::new("m", MachineSpec::default());
        m.status = Some(MachineStatus {
            last_seen: last_seen.map(String::from),
            certificate: enrolled.then(MachineCertificate::default),
            conditions: if marked {
                vec![condition(
                    AGENT_REACHABLE,
                    false,
                    "NoRecentReport",
                    "",
                    None,
                )]
            } else {
                vec![]
            },
            ..Default::default()
        });
        m
    }

    #[test]
    fn silence_table() {
        let now = OffsetDateTime::parse("2026-11-29T12:00:00Z", &Rfc3339).unwrap();
        let t = Duration::from_secs(45);
        let cases = [
            (
                "recent",
                machine(Some("2026-11-29T11:59:30Z"), true, false),
                false,
            ),
            (
                "silent",
                machine(Some("2026-11-29T11:59:00Z"), true, false),
                true,
            ),
            (
                "already marked",
                machine(Some("2026-11-29T11:00:00Z"), true, true),
                false,
            ),
            (
                "not enrolled",
                machine(Some("2026-11-29T11:00:00Z"), false, false),
                false,
            ),
            ("never seen", machine(None, true, false), false),
            (
                "garbage time",
                machine(Some("yesterday"), true, false),
                false,
            ),
        ];
        for (name, m, want) in cases {
            assert_eq!(goes_silent(&m, now, t).is_some(), want, "{name}");
        }
        let why = goes_silent(&machine(Some("2026-11-29T11:59:00Z"), true, false), now, t).unwrap();
        assert!(why.contains("60s") && why.contains("every 15s"), "{why}");
    }
}
