//! The machine API: the HTTPS endpoint agents talk to (types and paths in
//! `tether_api::machine_api`).
//!
//! - TLS with the API's own CA ([`certs`]); client certificates are optional at the
//!   handshake (enrollment has none) and required by every `/v1/machines/…` endpoint, where
//!   a certificate reaches only its own Machine, and only while that Machine exists and
//!   records that certificate (deleting the Machine revokes it).
//! - `POST /v1/enroll` ([`enroll`]): token + CSR + facts → machine certificate.
//! - `GET …/config` long-polls the desired config, `POST …/status` records reports,
//!   `POST …/renew` signs a new key ([`node`]).
//! - Bodies are limited to [`MAX_BODY`] bytes, enrollment is rate-limited
//!   ([`ratelimit`]), and every refusal is an HTTP status with a JSON
//!   `tether_api::machine_api::ApiError` body.
//!
//! The URL and CA pin are published in the ConfigMap `tether-system/tether-machine-api`,
//! where tether-pxe and `token create --user-data` read them.

pub mod certs;
pub mod enroll;
mod http;
pub mod inventory;
pub mod node;
pub mod ratelimit;
pub mod tokens;
mod waiters;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tether_api::machine_api::{CONFIG_MAP, KEY_CA_PIN, KEY_URL};
use tether_boot::CaPin;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::Error;
use certs::Ca;
use ratelimit::TokenBucket;
use tokens::Tokens;
use waiters::Waiters;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Field manager of the API's writes.
pub const MANAGER: &str = "tether-machine-api";

/// Defaults, one place for `Settings::new` and the command line.
const CERT_LIFETIME: &str = "30d";
const REPORT_SECONDS: u32 = 15;
const ENROLL_RATE: f64 = 20.0;
const ENROLL_BURST: u32 = 50;

/// How the machine API runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The URL nodes use (`https://<advertise address>:<port>`), published and put in the
    /// serving certificate.
    pub url: String,
    /// Machine certificate lifetime (renewed by the agent at two thirds).
    pub cert_lifetime: time::Duration,
    /// How often agents report; a machine is unreachable after three missed reports.
    pub report_seconds: u32,
    /// Enrollments per second, on average.
    pub enroll_rate: f64,
    /// Enrollments in a burst.
    pub enroll_burst: u32,
    /// NTP servers joined machines are told (empty: DHCP's).
    pub node_ntp: Vec<String>,
    /// DNS servers joined machines are told (empty: DHCP's).
    pub node_dns: Vec<IpAddr>,
}

impl Settings {
    /// Defaults for `listen` and `url`: 30-day certificates, 15 s reports, 20 enrollments a
    /// second with bursts of 50.
    pub fn new(listen: SocketAddr, url: String) -> Settings {
        let lifetime = humantime::parse_duration(CERT_LIFETIME).expect("a valid default");
        Tuning {
            machine_cert_lifetime: lifetime,
            report_seconds: REPORT_SECONDS,
            enroll_rate: ENROLL_RATE,
            enroll_burst: ENROLL_BURST,
            node_ntp_servers: Vec::new(),
            node_dns_servers: Vec::new(),
        }
        .settings(listen, url)
    }
}

/// The command-line knobs of the machine API, shared by `run` and `standalone`.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// Machine certificate lifetime (agents renew at two thirds of it), e.g. `30d`, `12h`.
    #[arg(long, default_value = CERT_LIFETIME, value_parser = humantime::parse_duration)]
    pub machine_cert_lifetime: Duration,
    /// Seconds between agent reports; a machine is unreachable after three missed ones.
    #[arg(long, default_value_t = REPORT_SECONDS, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub report_seconds: u32,
    /// Enrollments per second the machine API accepts, on average.
    #[arg(long, default_value_t = ENROLL_RATE, value_parser = positive_rate)]
    pub enroll_rate: f64,
    /// Enrollments accepted in a burst.
    #[arg(long, default_value_t = ENROLL_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub enroll_burst: u32,
    /// NTP servers (names or addresses, comma-separated) that joined machines use instead of
    /// the ones DHCP gives them — e.g. the management plane's, at an air-gapped site.
    #[arg(long, value_delimiter = ',', value_parser = ntp_server)]
    pub node_ntp_servers: Vec<String>,
    /// DNS servers (addresses, comma-separated) that joined machines use instead of DHCP's.
    #[arg(long, value_delimiter = ',')]
    pub node_dns_servers: Vec<IpAddr>,
}

/// `--node-ntp-servers`: an IP address or a DNS name.
fn ntp_server(s: &str) -> Result<String, String> {
    let name_ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if s.parse::<IpAddr>().is_ok() || name_ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is neither an IP address nor a DNS name"))
    }
}

/// `--enroll-rate`: a finite number above zero (zero would refuse every machine after the
/// first burst).
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a rate above zero")),
    }
}

impl Tuning {
    /// The settings for an API listening on `listen` and reached at `url`.
    pub fn settings(&self, listen: SocketAddr, url: String) -> Settings {
        Settings {
            listen,
            url,
            cert_lifetime: time::Duration::try_from(self.machine_cert_lifetime)
                .unwrap_or(time::Duration::days(30)),
            report_seconds: self.report_seconds,
            enroll_rate: self.enroll_rate,
            enroll_burst: self.enroll_burst,
            node_ntp: self.node_ntp_servers.clone(),
            node_dns: self.node_dns_servers.clone(),
        }
    }
}

/// The running API's shared state.
pub struct Server {
    client: kube::Client,
    namespace: String,
    settings: Settings,
    ca: Ca,
    tokens: Tokens,
    limiter: Mutex<TokenBucket>,
    recorder: kube::runtime::events::Recorder,
    waiters: Waiters,
    spend_locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A started machine API.
pub struct Running {
    /// The published URL.
    pub url: String,
    /// The published pin.
    pub pin: CaPin,
    /// Where it actually listens (the port, when `listen` asked for 0).
    pub local_addr: SocketAddr,
    /// The accept loop; it ends only on shutdown or with the error that killed it.
    pub task: JoinHandle<Result<(), Error>>,
}

/// Ensures the CA, publishes URL and pin, binds, and serves until `shutdown` is true.
pub async fn start(
    client: kube::Client,
    namespace: &str,
    settings: Settings,
    shutdown: watch::Receiver<bool>,
) -> Result<Running, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = Ca::ensure(&secrets).await?;
    let pin = ca.pin()?;
    let (dns, ips) = serving_names(&settings.url)?;
    let (chain, key) = ca.serving(&dns, &ips)?;
    let tls = http::server_tls(&ca.cert_pem, &chain, &key)?;
    let listener = TcpListener::bind(settings.listen).await.map_err(Error::io(
        "bind the machine API on",
        settings.listen.to_string(),
    ))?;
    let local_addr = listener.local_addr().map_err(Error::io(
        "read the address of",
        settings.listen.to_string(),
    ))?;
    publish(&client, namespace, &settings.url, &pin).await?;
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "tether-machine-api".into(),
            instance: None,
        },
    );
    let server = Arc::new(Server {
        tokens: Tokens::new(client.clone(), namespace),
        limiter: Mutex::new(TokenBucket::new(
            settings.enroll_rate,
            settings.enroll_burst,
            Instant::now(),
        )),
        namespace: namespace.to_string(),
        client: client.clone(),
        settings: settings.clone(),
        ca,
        recorder,
        waiters: Waiters::default(),
        spend_locks: Mutex::default(),
    });
    let watch = waiters::spawn_watch(client, server.clone());
    tracing::info!(url = %settings.url, listen = %local_addr, %pin, "machine API serving");
    let serving = http::serve(listener, tls, server, shutdown);
    // One task for both: if either ends, the API is not whole any more.
    let task = tokio::spawn(async move {
        tokio::select! {
            r = serving => r,
            _ = watch => Err(Error::Invalid("the machine watch of the machine API ended".into())),
        }
    });
    Ok(Running {
        url: settings.url,
        pin,
        local_addr,
        task,
    })
}

/// The host of `url` as a DNS name or an IP, plus loopback for local checks.
fn serving_names(url: &str) -> Result<(Vec<String>, Vec<IpAddr>), Error> {
    let uri: ::http::Uri = url
        .parse()
        .map_err(|e| Error::Invalid(format!("machine API URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Error::Invalid(format!(
            "machine API URL {url:?} must be https://"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| Error::Invalid(format!("machine API URL {url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut dns = vec!["localhost".to_string()];
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
    match host.parse::<IpAddr>() {
        Ok(ip) if !ips.contains(&ip) => ips.push(ip),
        Ok(_) => {}
        Err(_) => dns.push(host.to_string()),
    }
    Ok((dns, ips))
}

/// Writes the ConfigMap nodes' helpers read (tether-pxe, `token create --user-data`).
async fn publish(
    client: &kube::Client,
    namespace: &str,
    url: &str,
    pin: &CaPin,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": namespace},
        "data": {KEY_URL: url, KEY_CA_PIN: pin.to_string()},
    });
    api.patch(
        CONFIG_MAP,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(Error::kube(format!("apply ConfigMap {CONFIG_MAP}")))?;
    Ok(())
}

impl Server {
    /// Takes an enrollment slot or says how long to wait.
    fn admit_enrollment(&self) -> Result<(), Duration> {
        self.limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntp_servers_are_addresses_or_names() {
        for ok in ["10.0.0.1", "fd00::1", "ntp.site.example", "time1"] {
            assert!(ntp_server(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ntp..example", "-x.example", "a b", "x/y"] {
            assert!(ntp_server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serving_names_from_urls() {
        let (dns, ips) = serving_names("https://10.9.0.1:9443").unwrap();
        assert_eq!(dns, ["localhost"]);
        assert_eq!(
            ips,
            [IpAddr::from([127, 0, 0, 1]), IpAddr::from([10, 9, 0, 1])]
        );
        let (dns, _) = serving_names("https://api.site.example:9443/").unwrap();
        assert_eq!(dns, ["localhost", "api.site.example"]);
        let (_, ips) = serving_names("https://[fd00::1]:9443").unwrap();
        assert_eq!(ips[1], "fd00::1".parse::<IpAddr>().unwrap());
        assert!(serving_names("http://10.0.0.1").is_err());
        assert!(serving_names("not a url").is_err());
    }
}
