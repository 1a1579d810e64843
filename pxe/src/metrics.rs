//! Prometheus metrics, served at `/metrics` on the HTTP port.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use tether_boot::Mac;

type Labels = Vec<(&'static str, String)>;

/// Most per-MAC series of `boots`; further MACs, and MACs not seen on the segment, count
/// under `mac="other"`.
pub const MAX_BOOT_SERIES: usize = 1024;
/// The `mac` label value of the overflow series.
pub const OTHER_MAC: &str = "other";

/// Every counter tether-pxe keeps.
pub struct Metrics {
    registry: Registry,
    /// DHCP requests by decision label (see [`crate::dhcp::Decision::label`]).
    pub dhcp: Family<Labels, Counter>,
    /// TFTP requests by result (`served`, `refused_*`, `aborted`).
    pub tftp_requests: Family<Labels, Counter>,
    /// TFTP payload bytes sent.
    pub tftp_bytes: Counter,
    /// HTTP requests by route and status.
    pub http_requests: Family<Labels, Counter>,
    /// HTTP body bytes sent.
    pub http_bytes: Counter,
    /// Boot beacons by MAC: one per boot that reached our script.
    pub boots: Family<Labels, Counter>,
    boot_macs: Mutex<HashSet<Mac>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether_pxe");
        let m = Metrics {
            dhcp: Family::default(),
            tftp_requests: Family::default(),
            tftp_bytes: Counter::default(),
            http_requests: Family::default(),
            http_bytes: Counter::default(),
            boots: Family::default(),
            boot_macs: Mutex::new(HashSet::new()),
            registry: Registry::default(),
        };
        registry.register("dhcp_requests", "DHCP requests by decision", m.dhcp.clone());
        registry.register(
            "tftp_requests",
            "TFTP requests by result",
            m.tftp_requests.clone(),
        );
        registry.register(
            "tftp_bytes",
            "TFTP payload bytes sent",
            m.tftp_bytes.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        registry.register("http_bytes", "HTTP body bytes sent", m.http_bytes.clone());
        registry.register("boots", "Boot beacons by MAC", m.boots.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts one DHCP decision.
    pub fn dhcp(&self, decision: &'static str) {
        self.dhcp
            .get_or_create(&vec![("decision", decision.to_string())])
            .inc();
    }

    /// Counts one TFTP request outcome.
    pub fn tftp(&self, result: &'static str) {
        self.tftp_requests
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// Counts one HTTP response.
    pub fn http(&self, route: &'static str, status: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Counts one boot of `mac`: in its own series if it was `seen` on the segment and
    /// there is room for one more series ([`MAX_BOOT_SERIES`]), else under `other`.
    pub fn boot(&self, mac: Mac, seen: bool) {
        let own = seen && {
            let mut macs = self.boot_macs.lock().expect("boot series poisoned");
            macs.contains(&mac) || (macs.len() < MAX_BOOT_SERIES && macs.insert(mac))
        };
        let label = if own {
            mac.to_string()
        } else {
            OTHER_MAC.to_string()
        };
        self.boots.get_or_create(&vec![("mac", label)]).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_series_are_bounded() {
        let m = Metrics::default();
        let mac = |i: u32| Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        for i in 0..(MAX_BOOT_SERIES as u32 + 500) {
            m.boot(mac(i), true);
        }
        m.boot(mac(0), true);
        m.boot(mac(999_999), false);
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("tether_pxe_boots_total{"))
            .count();
        assert_eq!(series, MAX_BOOT_SERIES + 1, "cap + the overflow series");
        assert!(
            text.contains("tether_pxe_boots_total{mac=\"other\"} 501"),
            "{text}"
        );
        assert!(text.contains("tether_pxe_boots_total{mac=\"02:00:00:00:00:00\"} 2"));
    }
}
