//! MACs that DHCP'd on our segment recently: the evidence that a machine is really here, as
//! opposed to an HTTP client anywhere naming any MAC. The DHCP and proxyDHCP paths record
//! every netboot client they answer; the HTTP side creates objects (a `Discovered` Machine,
//! a boot token) and per-MAC metric series only for MACs found here.
//!
//! Bounded in size ([`RecentMacs::new`]'s `cap`, oldest dropped first) and in time (`ttl`),
//! so a flood of DISCOVERs from random MACs costs a fixed amount of memory. Every operation
//! is amortised O(1).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tether_boot::Mac;

/// Default number of MACs remembered.
pub const DEFAULT_CAP: usize = 4096;

/// A bounded, expiring set of MACs.
#[derive(Debug)]
pub struct RecentMacs {
    cap: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Last sighting of each MAC.
    at: HashMap<Mac, Instant>,
    /// Sightings in order; entries whose time is no longer `at[mac]` are stale.
    order: VecDeque<(Mac, Instant)>,
}

impl RecentMacs {
    /// Remembers at most `cap` MACs (at least 1), each for `ttl` after its last sighting.
    pub fn new(cap: usize, ttl: Duration) -> RecentMacs {
        RecentMacs {
            cap: cap.max(1),
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records a sighting of `mac` now.
    pub fn saw(&self, mac: Mac) {
        self.saw_at(mac, Instant::now());
    }

    /// Whether `mac` was sighted within the last `ttl`.
    pub fn seen(&self, mac: Mac) -> bool {
        self.seen_at(mac, Instant::now())
    }

    /// Records a sighting of `mac` at `now` (monotonic: never earlier than a previous one).
    pub fn saw_at(&self, mac: Mac, now: Instant) {
        let mut g = self.inner.lock().expect("recent MACs poisoned");
        g.at.insert(mac, now);
        g.order.push_back((mac, now));
        while let Some(&(m, t)) = g.order.front() {
            let current = g.at.get(&m) == Some(&t);
            if current && now.duration_since(t) <= self.ttl && g.at.len() <= self.cap {
                break;
            }
            if current {
                g.at.remove(&m);
            }
            g.order.pop_front();
        }
        // A few MACs sighted over and over leave stale entries behind a current one at
        // the front: rebuild the queue from the map when it outgrows it.
        if g.order.len() > 2 * g.at.len() + 64 {
            let mut live: Vec<(Mac, Instant)> = g.at.iter().map(|(m, t)| (*m, *t)).collect();
            live.sort_by_key(|(_, t)| *t);
            g.order = live.into();
        }
    }

    /// Whether `mac` was sighted within `ttl` before `now`.
    pub fn seen_at(&self, mac: Mac, now: Instant) -> bool {
        let g = self.inner.lock().expect("recent MACs poisoned");
        g.at.get(&mac)
            .is_some_and(|t| now.saturating_duration_since(*t) <= self.ttl)
    }

    /// MACs remembered (some may have expired since the last sighting of any MAC).
    pub fn len(&self) -> usize {
        self.inner.lock().expect("recent MACs poisoned").at.len()
    }

    /// True when no MAC is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Internal queue length, for the boundedness test.
    #[doc(hidden)]
    pub fn queue_len(&self) -> usize {
        self.inner.lock().expect("recent MACs poisoned").order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(i: u32) -> Mac {
        Mac([2, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1])
    }

    #[test]
    fn sightings_expire_after_the_ttl() {
        let r = RecentMacs::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(!r.seen_at(mac(1), t0));
        r.saw_at(mac(1), t0);
        assert!(r.seen_at(mac(1), t0 + Duration::from_secs(60)));
        assert!(!r.seen_at(mac(1), t0 + Duration::from_secs(61)));
        assert!(!r.seen_at(mac(2), t0), "only what was sighted");
        // A new sighting renews it.
        r.saw_at(mac(1), t0 + Duration::from_secs(50));
        assert!(r.seen_at(mac(1), t0 + Duration::from_secs(100)));
        // Expired entries are dropped on the next sighting of anything.
        r.saw_at(mac(3), t0 + Duration::from_secs(200));
        assert_eq!(r.len(), 1);
        assert!(r.seen_at(mac(3), t0 + Duration::from_secs(200)));
    }

    #[test]
    fn the_oldest_go_first_past_the_cap() {
        let r = RecentMacs::new(3, Duration::from_secs(600));
        let t0 = Instant::now();
        for i in 0..5 {
            r.saw_at(mac(i), t0 + Duration::from_millis(i as u64));
        }
        let now = t0 + Duration::from_secs(1);
        assert_eq!(r.len(), 3);
        assert!(!r.seen_at(mac(0), now) && !r.seen_at(mac(1), now));
        assert!((2..5).all(|i| r.seen_at(mac(i), now)));
        // Re-sighting mac(2) makes mac(3) the oldest.
        r.saw_at(mac(2), t0 + Duration::from_millis(10));
        r.saw_at(mac(9), t0 + Duration::from_millis(11));
        assert!(r.seen_at(mac(2), now) && !r.seen_at(mac(3), now));
    }

    #[test]
    fn a_flood_stays_bounded() {
        let r = RecentMacs::new(100, Duration::from_secs(600));
        let t0 = Instant::now();
        // One MAC pinned at the front, one sighted 100 000 times, many random ones.
        r.saw_at(mac(0), t0);
        for i in 0..200_000u32 {
            let t = t0 + Duration::from_micros(i as u64 + 1);
            r.saw_at(if i % 2 == 0 { mac(1) } else { mac(i) }, t);
            assert!(r.len() <= 100);
            assert!(r.queue_len() <= 2 * 100 + 64 + 1);
        }
    }
}
