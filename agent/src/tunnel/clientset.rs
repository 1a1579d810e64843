//! Streams to every konnectivity-server (upstream's pkg/agent/clientset.go). The agent knows
//! one address, usually a load balancer, and connects to it again and again until it holds a
//! stream to `serverCount` distinct serverIDs: each server only reaches agents that hold a
//! stream to it. A second stream to a server already held is closed and retried after the
//! jittered sync interval; real errors back off. When a stream ends, syncing resumes.
//!
//! The decisions ([`Pool`], [`backoff`], [`sync_delay`]) are pure; [`run`] is the edge.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::stream::{self, Connected, Counters};
use super::{Settings, Status};
use crate::error::Result;

/// Upstream's `--sync-interval`: the pause between connects while syncing, and the first
/// back-off step.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Upstream's `--sync-interval-cap`.
pub const SYNC_CAP: Duration = Duration::from_secs(10);
/// Back-off growth per failure.
pub const BACKOFF_FACTOR: f64 = 1.5;
/// ± share of jitter on every wait.
pub const JITTER: f64 = 0.1;

/// The servers held by this agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pool {
    held: BTreeSet<String>,
    /// By the last `serverCount` header; 0 until the first.
    server_count: usize,
}

/// What to do with a freshly connected stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A server not held yet: keep the stream.
    Keep,
    /// Already held: close it and try again later.
    Duplicate,
}

impl Pool {
    /// Whether another stream is wanted: fewer servers held than there are (at least one,
    /// before any header said how many).
    pub fn wants_more(&self) -> bool {
        self.held.len() < self.server_count.max(1)
    }

    /// Records a stream to `server_id` whose headers said `server_count`.
    pub fn admit(&mut self, server_id: &str, server_count: usize) -> Admission {
        self.server_count = server_count;
        if self.held.insert(server_id.to_string()) {
            Admission::Keep
        } else {
            Admission::Duplicate
        }
    }

    /// The stream to `server_id` ended.
    pub fn remove(&mut self, server_id: &str) {
        self.held.remove(server_id);
    }

    /// Servers held.
    pub fn held(&self) -> &BTreeSet<String> {
        &self.held
    }

    /// Servers there are, by the last header (0 before any).
    pub fn server_count(&self) -> usize {
        self.server_count
    }

    /// `n/count` for log lines.
    pub fn progress(&self) -> String {
        format!("{}/{}", self.held.len(), self.server_count.max(1))
    }
}

/// The wait after the `failures`-th consecutive failure (1-based): 1 s × 1.5ⁿ⁻¹, capped at
/// 10 s, then `jitter` (−1..=1) scales it by up to ±10 %.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let steps = failures.saturating_sub(1).min(64) as i32;
    let base =
        (SYNC_INTERVAL.as_secs_f64() * BACKOFF_FACTOR.powi(steps)).min(SYNC_CAP.as_secs_f64());
    Duration::from_secs_f64(base * (1.0 + JITTER * jitter.clamp(-1.0, 1.0)))
}

/// The pause between connects while syncing (after a success or a duplicate).
pub fn sync_delay(jitter: f64) -> Duration {
    backoff(1, jitter)
}

/// A number in −1..=1 from the process's random hash keys; good enough to spread agents.
fn jitter() -> f64 {
    let r = RandomState::new().hash_one(Instant::now());
    (r as f64 / u64::MAX as f64) * 2.0 - 1.0
}

/// How a settings generation ended.
enum Exit {
    /// The settings sender is gone: stop.
    Gone,
    /// New settings (or none): start over.
    Changed,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Connected>> + Send>>;

/// See [`super::run`].
pub async fn run(
    mut settings: watch::Receiver<Option<Settings>>,
    status: watch::Sender<Status>,
    mut drain: watch::Receiver<bool>,
) {
    loop {
        let current = settings.borrow_and_update().clone();
        let exit = match current {
            None => {
                publish(
                    &status,
                    &Pool::default(),
                    None,
                    *drain.borrow(),
                    &Counters::default(),
                );
                match settings.changed().await {
                    Ok(()) => Exit::Changed,
                    Err(_) => Exit::Gone,
                }
            }
            Some(s) => generation(s, &mut settings, &status, &mut drain).await,
        };
        if let Exit::Gone = exit {
            publish(
                &status,
                &Pool::default(),
                None,
                *drain.borrow(),
                &Counters::default(),
            );
            return;
        }
    }
}

fn publish(
    status: &watch::Sender<Status>,
    pool: &Pool,
    last_error: Option<&str>,
    draining: bool,
    counters: &Counters,
) {
    let next = Status {
        servers: pool.held().clone(),
        server_count: pool.server_count(),
        last_error: last_error.map(str::to_string),
        draining,
        drained: counters.drained.load(Ordering::Relaxed),
        open_connections: counters.open.load(Ordering::Relaxed),
    };
    status.send_if_modified(|s| {
        let changed = *s != next;
        *s = next;
        changed
    });
}

/// How often the status is refreshed while draining.
const DRAIN_REFRESH: Duration = Duration::from_millis(100);

/// Holds streams for one set of settings until they change in more than the token.
async fn generation(
    mut s: Settings,
    settings: &mut watch::Receiver<Option<Settings>>,
    status: &watch::Sender<Status>,
    drain: &mut watch::Receiver<bool>,
) -> Exit {
    let mut pool = Pool::default();
    let mut streams: JoinSet<Result<()>> = JoinSet::new();
    // Which server each stream task serves, so even a task that panicked is forgotten.
    let mut serving: HashMap<tokio::task::Id, String> = HashMap::new();
    let counters = Arc::new(Counters::default());
    let mut connecting: Option<Connecting> = None;
    let mut failures = 0u32;
    let mut next_attempt = Instant::now();
    let mut last_error: Option<String> = None;
    let mut draining = *drain.borrow_and_update();
    let mut drain_open = true;
    loop {
        publish(status, &pool, last_error.as_deref(), draining, &counters);
        let may_connect = !draining && pool.wants_more() && connecting.is_none();
        if may_connect && Instant::now() >= next_attempt {
            let s = s.clone();
            connecting = Some(Box::pin(async move { stream::connect(&s).await }));
        }
        let waiting = may_connect && connecting.is_none();
        tokio::select! {
            result = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                match result {
                    Ok(connected) => match pool.admit(&connected.server_id, connected.server_count) {
                        Admission::Keep => {
                            failures = 0;
                            last_error = None;
                            next_attempt = Instant::now() + sync_delay(jitter());
                            tracing::info!(
                                "tunnel: connected to server {} ({})",
                                connected.server_id,
                                pool.progress()
                            );
                            let id = connected.server_id.clone();
                            let server = s.server.clone();
                            let allow = s.allow.clone();
                            let drain = drain.clone();
                            let counters = counters.clone();
                            let task = streams.spawn(async move {
                                stream::serve(connected, &server, allow, drain, counters).await
                            });
                            serving.insert(task.id(), id);
                        }
                        Admission::Duplicate => {
                            tracing::debug!(
                                "tunnel: server {} already held ({}); closing the duplicate",
                                connected.server_id,
                                pool.progress()
                            );
                            drop(connected);
                            next_attempt = Instant::now() + sync_delay(jitter());
                        }
                    },
                    Err(e) => {
                        failures += 1;
                        let wait = backoff(failures, jitter());
                        tracing::warn!("tunnel: {e}; retrying in {:.1}s", wait.as_secs_f64());
                        last_error = Some(e.to_string());
                        next_attempt = Instant::now() + wait;
                    }
                }
            }
            Some(joined) = streams.join_next_with_id(), if !streams.is_empty() => {
                let (task, why, wait) = match joined {
                    Ok((task, Ok(()))) => (task, "closed by the server".to_string(), sync_delay(jitter())),
                    Ok((task, Err(e))) => {
                        last_error = Some(e.to_string());
                        failures += 1;
                        (task, e.to_string(), backoff(failures, jitter()))
                    }
                    // Streams are only aborted with the whole set; a panic is a bug.
                    Err(e) => {
                        failures += 1;
                        (e.id(), format!("task failed: {e}"), backoff(failures, jitter()))
                    }
                };
                let id = serving.remove(&task).unwrap_or_default();
                pool.remove(&id);
                tracing::info!("tunnel: server {id} ended: {why} ({})", pool.progress());
                // Sync again after a pause: right away the balancer would most likely send us
                // to a server still held, or to the one that just went away. A broken stream
                // counts as a failure, so a server that keeps dropping streams is backed off.
                next_attempt = Instant::now() + wait;
            }
            _ = tokio::time::sleep_until(next_attempt), if waiting => {}
            // While draining, the counters are what the exiting agent waits on.
            _ = tokio::time::sleep(DRAIN_REFRESH), if draining => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return Exit::Gone;
                }
                let new = settings.borrow_and_update().clone();
                match new {
                    Some(new) if new.same_streams(&s) => s.token = new.token,
                    _ => {
                        if !streams.is_empty() {
                            tracing::info!(
                                "tunnel: settings changed; closing {} stream(s)",
                                streams.len()
                            );
                        }
                        return Exit::Changed;
                    }
                }
            }
            changed = drain.changed(), if drain_open => {
                if changed.is_err() {
                    drain_open = false;
                } else {
                    draining = *drain.borrow_and_update();
                    if draining {
                        tracing::info!("tunnel: draining; no new streams");
                        connecting = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_and_caps() {
        let secs = |n| backoff(n, 0.0).as_secs_f64();
        let cases = [
            (1, 1.0),
            (2, 1.5),
            (3, 2.25),
            (4, 3.375),
            (6, 7.59375),
            (7, 10.0),
            (100, 10.0),
        ];
        for (n, want) in cases {
            assert!((secs(n) - want).abs() < 1e-9, "{n}: {}", secs(n));
        }
        // 0 failures is treated as the first.
        assert_eq!(backoff(0, 0.0), SYNC_INTERVAL);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let cases = [
            (1, -1.0, 0.9),
            (1, 1.0, 1.1),
            (7, -1.0, 9.0),
            (7, 1.0, 11.0),
            (7, 5.0, 11.0),
        ];
        for (n, j, want) in cases {
            assert!((backoff(n, j).as_secs_f64() - want).abs() < 1e-9, "{n} {j}");
        }
        for _ in 0..100 {
            let j = jitter();
            assert!((-1.0..=1.0).contains(&j), "{j}");
            let d = sync_delay(j).as_secs_f64();
            assert!((0.9..=1.1).contains(&d), "{d}");
        }
    }

    #[test]
    fn pool_wants_one_stream_per_server() {
        let mut p = Pool::default();
        // Before any header: one stream.
        assert!(p.wants_more());
        assert_eq!(p.admit("a", 2), Admission::Keep);
        assert!(p.wants_more());
        assert_eq!(p.progress(), "1/2");
        // The load balancer sent us to `a` again.
        assert_eq!(p.admit("a", 2), Admission::Duplicate);
        assert!(p.wants_more());
        assert_eq!(p.admit("b", 2), Admission::Keep);
        assert!(!p.wants_more());
        assert_eq!(
            p.held().iter().map(String::as_str).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // A stream ends: sync again.
        p.remove("a");
        assert!(p.wants_more());
        assert_eq!(p.progress(), "1/2");
        assert_eq!(p.admit("a", 2), Admission::Keep);
        assert!(!p.wants_more());
    }

    #[test]
    fn pool_follows_the_latest_server_count() {
        let mut p = Pool::default();
        assert_eq!(p.admit("a", 1), Admission::Keep);
        assert!(!p.wants_more());
        // The servers were scaled up.
        assert_eq!(p.admit("b", 3), Admission::Keep);
        assert!(p.wants_more());
        assert_eq!(p.server_count(), 3);
        // A header of 0 (misconfigured) still keeps one stream.
        let mut p = Pool::default();
        p.admit("a", 0);
        assert!(!p.wants_more());
        p.remove("a");
        assert!(p.wants_more());
    }
}
