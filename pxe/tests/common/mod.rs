//! Helpers shared by tether-pxe's integration tests: a raw HTTP/1.1 client (so what is tested
//! is the bytes on the wire) and an App on loopback.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use tether_pxe::artifacts::Store;
use tether_pxe::http::{self, App};
use tether_pxe::metrics::Metrics;
use tether_pxe::recent::RecentMacs;
use tether_pxe::script::Enrollment;
use tether_pxe::source::BootSource;
use tether_pxe::tftp::Files;
use tokio::sync::{Semaphore, watch};

/// A parsed response: status, lower-cased headers, body.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection (`Connection: close`), read to EOF.
pub fn get(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The enrollment values a site passes with flags (TOML source).
pub fn site_enrollment() -> Enrollment {
    Enrollment::new(
        Some("https://10.0.0.1:6443".into()),
        Some(format!("sha256:{}", "ab".repeat(32)).parse().unwrap()),
        Some("abcdef.0123456789abcdef".parse().unwrap()),
    )
    .unwrap()
}

/// Starts the HTTP server on loopback; returns its address, the shutdown sender, the
/// metrics and the recent-MAC set (which stands in for the DHCP side: mark MACs seen there).
pub async fn start_http(
    source: Arc<dyn BootSource>,
    store: Store,
    files: Files,
    slots: usize,
) -> (
    SocketAddr,
    watch::Sender<bool>,
    Arc<Metrics>,
    Arc<RecentMacs>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::default());
    let recent = Arc::new(RecentMacs::new(64, std::time::Duration::from_secs(600)));
    let app = Arc::new(App {
        source,
        store,
        files,
        http_base: format!("http://{addr}"),
        recent: recent.clone(),
        metrics: metrics.clone(),
        artifact_slots: Arc::new(Semaphore::new(slots)),
    });
    let (tx, rx) = watch::channel(false);
    tokio::spawn(http::serve(listener, app, rx));
    (addr, tx, metrics, recent)
}
