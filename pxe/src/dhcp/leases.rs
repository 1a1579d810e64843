//! The full-DHCP address pool and its lease book, persisted to one JSON file.
//!
//! Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the
//! directory), so a crash at any point leaves either the old or the new book on disk. A book
//! that does not parse is a start-up error: silently starting empty would hand out
//! addresses that machines still hold.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Lease;
use crate::error::{Error, Result};
use tether_boot::Mac;

/// How long an offered (not yet requested) address stays reserved.
const OFFER_HOLD_SECS: u64 = 60;

/// The range of addresses we may hand out and what comes with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// First address of the range.
    pub start: Ipv4Addr,
    /// Last address of the range (inclusive).
    pub end: Ipv4Addr,
    /// The segment's netmask.
    pub netmask: Ipv4Addr,
    /// Default gateway, if any.
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

impl Pool {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }

    fn lease(&self, ip: Ipv4Addr) -> Lease {
        Lease {
            ip,
            netmask: self.netmask,
            router: self.router,
            secs: self.lease_secs,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    mac: String,
    ip: Ipv4Addr,
    /// Unix seconds.
    expires: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Book {
    leases: Vec<Record>,
}

/// Address bindings by MAC.
#[derive(Debug)]
pub struct Leases {
    pool: Pool,
    by_mac: BTreeMap<Mac, (Ipv4Addr, u64)>,
    path: Option<PathBuf>,
}

impl Leases {
    /// An empty, unpersisted book.
    pub fn new(pool: Pool) -> Result<Leases> {
        if u32::from(pool.start) > u32::from(pool.end) {
            return Err(Error::Config {
                path: "flags".into(),
                detail: format!("pool start {} is after end {}", pool.start, pool.end),
            });
        }
        Ok(Leases {
            pool,
            by_mac: BTreeMap::new(),
            path: None,
        })
    }

    /// Loads the book at `path` (absent means empty); later changes are saved there.
    pub fn load(pool: Pool, path: &Path) -> Result<Leases> {
        let mut leases = Leases::new(pool)?;
        let bad = |detail: String| Error::Leases {
            path: path.to_path_buf(),
            detail,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let book: Book = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("does not parse ({e}); fix or remove it")))?;
                for r in book.leases {
                    let mac: Mac = r.mac.parse().map_err(|e| bad(format!("{e}")))?;
                    leases.by_mac.insert(mac, (r.ip, r.expires));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bad(e.to_string())),
        }
        leases.path = Some(path.to_path_buf());
        Ok(leases)
    }

    /// The address `mac` holds, if its lease has not expired.
    pub fn get(&self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        self.by_mac
            .get(&mac)
            .filter(|(_, exp)| *exp > now)
            .map(|(ip, _)| *ip)
    }

    fn taken_by_other(&self, ip: Ipv4Addr, mac: Mac, now: u64) -> bool {
        self.by_mac
            .iter()
            .any(|(m, (i, exp))| *m != mac && *i == ip && *exp > now)
    }

    /// Picks an address for a DISCOVER: the client's previous one (even if expired, while
    /// nobody else took it), else its requested one if free, else the first free one.
    pub fn offer(&mut self, mac: Mac, requested: Option<Ipv4Addr>, now: u64) -> Result<Lease> {
        let prev = self.by_mac.get(&mac).map(|(ip, _)| *ip);
        let candidates = prev.into_iter().chain(requested);
        let mut pick = None;
        for ip in candidates {
            if self.pool.contains(ip) && !self.taken_by_other(ip, mac, now) {
                pick = Some(ip);
                break;
            }
        }
        if pick.is_none() {
            pick = (u32::from(self.pool.start)..=u32::from(self.pool.end))
                .map(Ipv4Addr::from)
                .find(|ip| !self.taken_by_other(*ip, mac, now));
        }
        let ip = pick.ok_or(Error::PoolExhausted)?;
        let held = self.by_mac.get(&mac).map(|(_, e)| *e).unwrap_or(0);
        self.by_mac
            .insert(mac, (ip, held.max(now + OFFER_HOLD_SECS)));
        Ok(self.pool.lease(ip))
    }

    /// Confirms a REQUEST for `ip`; `None` (→ NAK) when it is not in the pool or is someone
    /// else's.
    pub fn ack(&mut self, mac: Mac, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        if !self.pool.contains(ip) || self.taken_by_other(ip, mac, now) {
            return None;
        }
        self.by_mac
            .insert(mac, (ip, now + u64::from(self.pool.lease_secs)));
        Some(self.pool.lease(ip))
    }

    /// Writes the book atomically, if it has a file.
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let book = Book {
            leases: self
                .by_mac
                .iter()
                .map(|(m, (ip, exp))| Record {
                    mac: m.to_string(),
                    ip: *ip,
                    expires: *exp,
                })
                .collect(),
        };
        let io = |e: std::io::Error| Error::Leases {
            path: path.clone(),
            detail: e.to_string(),
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&serde_json::to_vec_pretty(&book).expect("lease book serializes"))
                .map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool {
            start: Ipv4Addr::new(10, 0, 0, 10),
            end: Ipv4Addr::new(10, 0, 0, 11),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            lease_secs: 600,
        }
    }
    const A: Mac = Mac([2, 0, 0, 0, 0, 1]);
    const B: Mac = Mac([2, 0, 0, 0, 0, 2]);
    const C: Mac = Mac([2, 0, 0, 0, 0, 3]);

    #[test]
    fn allocation_and_exhaustion() {
        let mut l = Leases::new(pool()).unwrap();
        let a = l.offer(A, None, 100).unwrap().ip;
        assert_eq!(a, Ipv4Addr::new(10, 0, 0, 10));
        assert_eq!(l.offer(A, None, 101).unwrap().ip, a, "stable per MAC");
        let b = l.offer(B, Some(a), 100).unwrap().ip;
        assert_eq!(b, Ipv4Addr::new(10, 0, 0, 11), "requested but taken");
        assert!(matches!(l.offer(C, None, 100), Err(Error::PoolExhausted)));
        assert!(l.ack(C, a, 100).is_none(), "someone else's address");
        assert!(
            l.ack(C, Ipv4Addr::new(10, 0, 1, 1), 100).is_none(),
            "outside pool"
        );
        assert_eq!(l.ack(A, a, 100).unwrap().secs, 600);
        // After B's offer hold expires, C can have its address.
        assert_eq!(l.offer(C, None, 100 + OFFER_HOLD_SECS + 1).unwrap().ip, b);
        assert!(
            Leases::new(Pool {
                start: Ipv4Addr::new(10, 0, 0, 9),
                end: Ipv4Addr::new(10, 0, 0, 1),
                ..pool()
            })
            .is_err()
        );
    }

    #[test]
    fn survives_restart_and_rejects_corrupt_book() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let mut l = Leases::load(pool(), &path).unwrap();
        let ip = l.offer(A, None, 100).unwrap().ip;
        l.ack(A, ip, 100).unwrap();
        l.save().unwrap();
        let l2 = Leases::load(pool(), &path).unwrap();
        assert_eq!(l2.get(A, 200), Some(ip));
        assert_eq!(l2.get(A, 100 + 600), None, "expired");
        assert!(!dir.path().join("leases.tmp").exists());

        std::fs::write(&path, b"{not json").unwrap();
        let err = Leases::load(pool(), &path).unwrap_err();
        assert!(err.to_string().contains("does not parse"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{not json",
            "left untouched"
        );
        std::fs::write(
            &path,
            br#"{"leases":[{"mac":"zz","ip":"10.0.0.10","expires":1}]}"#,
        )
        .unwrap();
        assert!(Leases::load(pool(), &path).is_err());
    }
}
