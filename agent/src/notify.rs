//! systemd's notify protocol (the unit is `Type=notify` with `WatchdogSec=`): `READY=1` once
//! the agent runs, `STATUS=` for what it is doing, and `WATCHDOG=1` only while the main loop
//! makes progress — a pinger independent of the loop would keep a wedged agent alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Progress of the main loop, and the watchdog fed from it.
#[derive(Clone)]
pub struct Notifier {
    started: Instant,
    last_beat_ms: Arc<AtomicU64>,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            started: Instant::now(),
            last_beat_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Notifier {
    /// Tells systemd the service is up; starts the watchdog feeder if `WatchdogSec=` is set.
    pub fn ready(&self) {
        let _ = sd_notify::notify(&[NotifyState::Ready]);
        if let Some(period) = sd_notify::watchdog_enabled() {
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period / 3);
                loop {
                    tick.tick().await;
                    if me.since_beat() < period {
                        let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                    }
                }
            });
        }
    }

    /// `STATUS=…` (shown by `systemctl status`).
    pub fn status(&self, text: &str) {
        let _ = sd_notify::notify(&[NotifyState::Status(text)]);
        self.beat();
    }

    /// The main loop made progress.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    fn since_beat(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(
            self.last_beat_ms.load(Ordering::Relaxed),
        ))
    }

    /// Waits `d` on purpose (a backoff, the clock): in slices short enough for the
    /// watchdog, each one counted as progress.
    pub async fn sleep(&self, d: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            self.beat();
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_secs(10))).await;
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
    }
}
