//! Enrollment: token + CSR + facts in exchange for a machine certificate, in named phases.
//!
//! | phase | does | a crash here leaves |
//! |---|---|---|
//! | `inputs` | finds URL, pin and token ([`crate::inputs`]) | nothing |
//! | `clock` | waits for a plausible clock | nothing |
//! | `key` | loads or generates `machine.key` (0600) | a key, reused next time |
//! | `request` | pinned TLS, `POST /v1/enroll` | maybe a spent token: the API remembers the key |
//! | `save` | writes `machine.json` | a spent token and no certificate: the next run sends the same key and gets the same certificate back |
//!
//! Each phase is logged as `enroll phase=<name>` before it runs; the kill tests read that.
//! `TETHER_AGENT_PHASE_PAUSE_MS` makes the agent pause that long after announcing each
//! phase — a test hook so a killer can land inside a phase, documented rather than hidden.

use std::path::Path;
use std::time::Duration;

use tether_api::machine_api::EnrollRequest;
use tether_boot::seed::Seed;

use crate::api::MachineApi;
use crate::error::Result;
use crate::identity::{self, Enrolled, Identity, StateDir};
use crate::inputs::{self, Inputs};
use crate::notify::Notifier;
use crate::{clock, facts};

/// A named step of enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Finding the inputs.
    Inputs,
    /// Waiting for the clock.
    Clock,
    /// Loading or making the key.
    Key,
    /// Talking to the API.
    Request,
    /// Saving the certificate.
    Save,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 5] = [
        Phase::Inputs,
        Phase::Clock,
        Phase::Key,
        Phase::Request,
        Phase::Save,
    ];

    /// The name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Inputs => "inputs",
            Phase::Clock => "clock",
            Phase::Key => "key",
            Phase::Request => "request",
            Phase::Save => "save",
        }
    }
}

/// The test hook's environment variable.
pub const PAUSE_ENV: &str = "TETHER_AGENT_PHASE_PAUSE_MS";

async fn enter(phase: Phase) {
    tracing::info!(phase = phase.name(), "enroll phase={}", phase.name());
    if let Some(ms) = std::env::var(PAUSE_ENV).ok().and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Enrolls once: `seed` if given, else the inputs found below `root`. `notify` hears of
/// the phases (and of progress while the clock is waited for).
pub async fn enroll(
    root: &Path,
    state: &StateDir,
    seed: Option<Seed>,
    notify: &Notifier,
) -> Result<Identity> {
    enter(Phase::Inputs).await;
    let inputs = match seed {
        Some(seed) => Inputs {
            seed,
            origin: "command-line flags".into(),
            boot: inputs::boot_params(root).unwrap_or_default(),
        },
        None => inputs::resolve(root, root == Path::new("/")).await?,
    };
    tracing::info!(api = %inputs.seed.api, pin = %inputs.seed.ca_pin, token_id = inputs.seed.token.id(), "enrolling with inputs from {}", inputs.origin);

    enter(Phase::Clock).await;
    clock::wait_plausible(Duration::from_secs(1), || notify.beat()).await;

    enter(Phase::Key).await;
    let key = state.key()?;
    let csr = identity::csr(&key)?;

    enter(Phase::Request).await;
    let live = root == Path::new("/");
    let links = if live {
        facts::live_links()
    } else {
        Vec::new()
    };
    let req = EnrollRequest {
        token: inputs.seed.token.to_string(),
        csr,
        facts: facts::gather(root, &inputs.boot, &links),
    };
    let api = MachineApi::pinned(&inputs.seed.api, inputs.seed.ca_pin)?;
    let resp = api.enroll(&req).await?;
    // From now on the node trusts the CA it was handed: it must be the pinned one.
    match tether_boot::CaPin::of_certificate_pem(resp.ca.as_bytes()) {
        Ok(pin) if pin == inputs.seed.ca_pin => {}
        other => {
            return Err(crate::Error::Untrusted {
                url: inputs.seed.api.clone(),
                detail: format!(
                    "the CA in the enrollment answer does not match the pin {} ({other:?})",
                    inputs.seed.ca_pin
                ),
            });
        }
    }

    enter(Phase::Save).await;
    let id = state.save(
        &Enrolled {
            api: inputs.seed.api.clone(),
            machine: resp.machine,
            certificate: resp.certificate,
            ca: resp.ca,
            received: 0,
        },
        &key,
    )?;
    tracing::info!(machine = %id.enrolled.machine, "enrolled");
    Ok(id)
}
