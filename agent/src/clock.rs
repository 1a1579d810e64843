//! TLS needs a sane clock (DESIGN.md "The node contract"): a node that booted with its RTC
//! at 1970 would reject every certificate, or be handed one it thinks is not yet valid. The
//! agent waits for a plausible clock before its first contact and says so in its log; the
//! image's systemd-timesyncd sets it from the NTP servers DHCP hands out.

use std::time::{Duration, SystemTime};

/// 2026-01-01T00:00:00Z: no clock that runs this agent can rightly be earlier.
pub const EARLIEST_PLAUSIBLE: u64 = 1_767_225_600;

/// Whether `now` can be right.
pub fn plausible(now: SystemTime) -> bool {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() >= EARLIEST_PLAUSIBLE)
        .unwrap_or(false)
}

/// Returns once the clock is plausible, logging once while it is not; `tick` runs at every
/// poll (the service counts waiting as progress for its watchdog).
pub async fn wait_plausible(poll: Duration, tick: impl Fn()) {
    let mut said = false;
    while !plausible(SystemTime::now()) {
        if !said {
            tracing::warn!(
                now = ?SystemTime::now(),
                "waiting for a plausible clock before contacting the machine API (NTP servers come from DHCP)"
            );
            said = true;
        }
        tick();
        tokio::time::sleep(poll).await;
    }
    if said {
        tracing::info!("clock is plausible now");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plausibility() {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(!plausible(at(0)));
        assert!(!plausible(at(EARLIEST_PLAUSIBLE - 1)));
        assert!(plausible(at(EARLIEST_PLAUSIBLE)));
        assert!(plausible(SystemTime::now()), "this machine's clock");
    }
}
