//! Prometheus metrics, served at `/metrics` on the HTTP port.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

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

    /// Counts one boot of `mac`.
    pub fn boot(&self, mac: &str) {
        self.boots
            .get_or_create(&vec![("mac", mac.to_string())])
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}
