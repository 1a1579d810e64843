//! Long-poll wake-ups: one `Notify` per Machine, woken by a watch on Machines and one on the
//! join Secrets the pool controller renders, so a config long-poll returns as soon as its
//! Machine or its join changes instead of on a timer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tether_api::Machine;

use crate::machines::join::JOIN_LABEL;
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

/// Watches Machines and join Secrets, waking their long-polls; runs as long as the API (it
/// retries API errors with backoff, so it ends only if a watch stream itself ends).
pub fn spawn_watch(client: kube::Client, server: Arc<Server>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let machines: Api<Machine> = Api::all(client.clone());
        let mut machines = watcher(machines, watcher::Config::default())
            .default_backoff()
            .boxed();
        let secrets: Api<Secret> = Api::namespaced(client, &server.namespace);
        let mut joins = watcher(secrets, watcher::Config::default().labels(JOIN_LABEL))
            .default_backoff()
            .boxed();
        loop {
            tokio::select! {
                ev = machines.next() => match ev {
                    Some(Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m))) => {
                        server.waiters.wake(&m.name_any(), false)
                    }
                    Some(Ok(watcher::Event::Delete(m))) => server.waiters.wake(&m.name_any(), true),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::debug!("machine watch: {e}"),
                    None => return,
                },
                ev = joins.next() => match ev {
                    Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s) | watcher::Event::Delete(s))) => {
                        if let Some(m) = s.labels().get(JOIN_LABEL) {
                            server.waiters.wake(m, false);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::debug!("join Secret watch: {e}"),
                    None => return,
                },
            }
        }
    })
}
