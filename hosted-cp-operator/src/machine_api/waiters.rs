//! Long-poll wake-ups: one `Notify` per Machine, woken by a watch on Machines, so a config
//! long-poll returns as soon as its Machine changes instead of on a timer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tether_api::Machine;
use tokio::sync::Notify;

use super::Server;

/// Per-Machine wake-ups.
#[derive(Default)]
pub struct Waiters(Mutex<HashMap<String, Arc<Notify>>>);

impl Waiters {
    /// The `Notify` of `machine` (made on first use; only authorised callers get here).
    /// Entries nobody waits on any more are dropped, so the map is as large as the number
    /// of long-polls in flight.
    pub fn of(&self, machine: &str) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, n| Arc::strong_count(n) > 1);
        map.entry(machine.to_string()).or_default().clone()
    }

    fn wake(&self, machine: &str, gone: bool) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get(machine) {
            n.notify_waiters();
        }
        if gone {
            map.remove(machine);
        }
    }
}

/// Watches Machines, waking their long-polls; runs as long as the API (it retries API errors
/// with backoff, so it ends only if the watch stream itself ends).
pub fn spawn_watch(client: kube::Client, server: Arc<Server>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<Machine> = Api::all(client);
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(m)) | Ok(watcher::Event::InitApply(m)) => {
                    server.waiters.wake(&m.name_any(), false)
                }
                Ok(watcher::Event::Delete(m)) => server.waiters.wake(&m.name_any(), true),
                Ok(_) => {}
                Err(e) => tracing::debug!("machine watch: {e}"),
            }
        }
    })
}
