//! Which machines a WorkerPool takes and gives back: pure decisions over the Machines as
//! listed, with table tests. The pool controller writes them, each claim guarded by the
//! Machine's `resourceVersion`, so two pools racing for one machine cannot both win.

use std::collections::BTreeMap;

use kube::ResourceExt;
use tether_api::worker_pool::LabelSelector;
use tether_api::{Machine, MachinePhase};

/// Annotation on a Machine its pool is giving back; the value is the stage.
pub const RELEASE_ANNOTATION: &str = "tether.dev/release";
/// Release stage: the Node is cordoned and drained; the node still runs.
pub const STAGE_DRAIN: &str = "drain";

/// The labels a selector sees on a Machine: its metadata labels, then `spec.labels` (set by
/// users or from facts) where metadata has none of the same key.
pub fn labels_of(m: &Machine) -> BTreeMap<String, String> {
    let mut l = m.spec.labels.clone();
    l.extend(m.labels().clone());
    l
}

/// Whether `m` is free for any pool: enrolled (it holds a machine certificate), claimed by
/// nobody, nothing of a tenant left on it, not being deleted.
pub fn is_free(m: &Machine) -> bool {
    let Some(s) = m.status.as_ref() else {
        return false;
    };
    m.spec.pool.is_none()
        && m.metadata.deletion_timestamp.is_none()
        && s.certificate.is_some()
        && s.phase == MachinePhase::Enrolled
        && s.tenant.is_none()
        && !m.annotations().contains_key(RELEASE_ANNOTATION)
}

/// The Machines the pool `key` holds (including ones it is releasing).
pub fn owned<'a>(machines: &'a [Machine], key: &str) -> Vec<&'a Machine> {
    machines
        .iter()
        .filter(|m| m.spec.pool.as_deref() == Some(key))
        .collect()
}

/// Whether the pool is giving `m` back.
pub fn releasing(m: &Machine) -> bool {
    m.annotations().contains_key(RELEASE_ANNOTATION)
        || m.status.as_ref().map(|s| s.phase) == Some(MachinePhase::Released)
}

/// Up to `want` free Machines matching `selector`, by name: a deterministic order, so the
/// same inventory always gives the same pool the same machines.
pub fn to_claim(machines: &[Machine], selector: &LabelSelector, want: usize) -> Vec<String> {
    let mut free: Vec<String> = machines
        .iter()
        .filter(|m| is_free(m) && selector.matches(&labels_of(m)))
        .map(|m| m.name_any())
        .collect();
    free.sort();
    free.truncate(want);
    free
}

/// Which of the pool's kept (not releasing) Machines to give back to shrink by `excess`:
/// those furthest from Ready first, then the highest names.
pub fn to_release(kept: &[&Machine], excess: usize) -> Vec<String> {
    let rank = |m: &Machine| match m.status.as_ref().map(|s| s.phase) {
        Some(MachinePhase::Ready) => 0,
        Some(MachinePhase::Joining) => 1,
        Some(MachinePhase::Installing) => 2,
        _ => 3,
    };
    let mut v: Vec<(u8, String)> = kept.iter().map(|m| (rank(m), m.name_any())).collect();
    // Highest rank (least ready) first, then the highest name.
    v.sort_by(|a, b| b.cmp(a));
    v.into_iter().take(excess).map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;
    use tether_api::{MachineCertificate, MachineSpec, MachineStatus};

    fn machine(
        name: &str,
        phase: MachinePhase,
        pool: Option<&str>,
        labels: &[(&str, &str)],
    ) -> Machine {
        Machine {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: MachineSpec {
                pool: pool.map(Into::into),
                ..Default::default()
            },
            status: Some(MachineStatus {
                phase,
                certificate: Some(MachineCertificate::default()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_clean_enrolled_unclaimed_machines_are_free() {
        let ok = machine("a", MachinePhase::Enrolled, None, &[]);
        assert!(is_free(&ok));
        let cases: Vec<(&str, Machine)> = vec![
            (
                "claimed",
                machine("a", MachinePhase::Enrolled, Some("ns/p"), &[]),
            ),
            (
                "discovered",
                machine("a", MachinePhase::Discovered, None, &[]),
            ),
            ("released", machine("a", MachinePhase::Released, None, &[])),
            ("no certificate", {
                let mut m = ok.clone();
                m.status.as_mut().unwrap().certificate = None;
                m
            }),
            ("a tenant's software still on it", {
                let mut m = ok.clone();
                m.status.as_mut().unwrap().tenant = Some("ns/t".into());
                m
            }),
            ("being deleted", {
                let mut m = ok.clone();
                m.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ));
                m
            }),
        ];
        for (why, m) in cases {
            assert!(!is_free(&m), "{why}");
        }
    }

    #[test]
    fn claims_are_deterministic_and_selected() {
        let ms = vec![
            machine("m3", MachinePhase::Enrolled, None, &[("rack", "r1")]),
            machine("m1", MachinePhase::Enrolled, None, &[("rack", "r1")]),
            machine("m2", MachinePhase::Enrolled, None, &[("rack", "r2")]),
            machine(
                "m0",
                MachinePhase::Ready,
                Some("ns/other"),
                &[("rack", "r1")],
            ),
        ];
        let all = LabelSelector::default();
        assert_eq!(to_claim(&ms, &all, 2), ["m1", "m2"]);
        assert_eq!(to_claim(&ms, &all, 9), ["m1", "m2", "m3"]);
        let r1 = LabelSelector {
            match_labels: [("rack".to_string(), "r1".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(to_claim(&ms, &r1, 9), ["m1", "m3"]);
        assert!(to_claim(&ms, &r1, 0).is_empty());
    }

    #[test]
    fn releases_the_least_ready_then_the_highest_names() {
        let ms = [
            machine("m1", MachinePhase::Ready, Some("p"), &[]),
            machine("m2", MachinePhase::Ready, Some("p"), &[]),
            machine("m3", MachinePhase::Installing, Some("p"), &[]),
            machine("m0", MachinePhase::Assigned, Some("p"), &[]),
        ];
        let kept: Vec<&Machine> = ms.iter().collect();
        assert_eq!(to_release(&kept, 1), ["m0"]);
        assert_eq!(to_release(&kept, 3), ["m0", "m3", "m2"]);
        assert!(to_release(&kept, 0).is_empty());
    }

    #[test]
    fn spec_labels_count_but_metadata_wins() {
        let mut m = machine("a", MachinePhase::Enrolled, None, &[("rack", "r1")]);
        m.spec.labels = [
            ("rack".to_string(), "r9".to_string()),
            ("gpu".to_string(), "y".to_string()),
        ]
        .into();
        let l = labels_of(&m);
        assert_eq!(l["rack"], "r1");
        assert_eq!(l["gpu"], "y");
    }
}
