//! `tether-pxe serve`: flags, start-up checks and the wiring of DHCP, TFTP and HTTP.
//!
//! Everything that can be wrong is checked before any socket opens: the iPXE binaries exist,
//! the configuration parses and its files hash, the enrollment values are safe to put on a
//! kernel command line, the lease book parses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};

use crate::artifacts::Store;
use crate::dhcp::leases::{Leases, Pool};
use crate::dhcp::{self, BIOS_FILE, BootServer, EFI_FILE, Port};
use crate::error::{Error, Result};
use crate::http::{self, App};
use crate::metrics::Metrics;
use crate::script::{self, Enrollment};
use crate::source::{BootSource, config::ConfigSource, kube::KubeSource};
use crate::tftp::{self, Files};

/// Where Debian's `ipxe` package puts its binaries.
pub const DEFAULT_IPXE_DIRS: &[&str] = &["/usr/lib/ipxe", "/boot"];

/// Flags of `tether-pxe serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Interface on the boot segment; DHCP sockets are bound to it (SO_BINDTODEVICE).
    #[arg(long, env = "TETHER_PXE_INTERFACE")]
    pub interface: Option<String>,
    /// Our IPv4 address as clients reach it; default: the interface's first IPv4 address.
    #[arg(long)]
    pub address: Option<Ipv4Addr>,
    /// Do not run DHCP at all (another server already points clients at us).
    #[arg(long)]
    pub no_dhcp: bool,
    /// Run a full DHCP server with an address pool instead of proxyDHCP.
    #[arg(long, requires_all = ["pool_start", "pool_end"])]
    pub full_dhcp: bool,
    /// First address of the full-DHCP pool.
    #[arg(long)]
    pub pool_start: Option<Ipv4Addr>,
    /// Last address of the full-DHCP pool.
    #[arg(long)]
    pub pool_end: Option<Ipv4Addr>,
    /// Netmask handed out in full-DHCP mode.
    #[arg(long, default_value = "255.255.255.0")]
    pub netmask: Ipv4Addr,
    /// Default gateway handed out in full-DHCP mode.
    #[arg(long)]
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds (full-DHCP mode).
    #[arg(long, default_value_t = 3600)]
    pub lease_secs: u32,
    /// Lease book (full-DHCP mode); leases survive restarts through it.
    #[arg(long, default_value = "/var/lib/tether-pxe/leases.json")]
    pub lease_file: PathBuf,
    /// DHCP server port.
    #[arg(long, default_value_t = 67)]
    pub dhcp_port: u16,
    /// PXE boot-server (proxyDHCP) port.
    #[arg(long, default_value_t = 4011)]
    pub proxy_port: u16,
    /// Port broadcast DHCP replies are sent to.
    #[arg(long, default_value_t = 68)]
    pub dhcp_client_port: u16,
    /// TFTP port.
    #[arg(long, default_value_t = 69)]
    pub tftp_port: u16,
    /// HTTP port (scripts, artifacts, metrics).
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    /// Address the TFTP and HTTP listeners bind to; default 0.0.0.0.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen: IpAddr,
    /// Directory holding undionly.kpxe and ipxe.efi; default: Debian's /usr/lib/ipxe.
    #[arg(long)]
    pub ipxe_dir: Option<PathBuf>,
    /// Extra file served over TFTP under its file name (repeatable).
    #[arg(long)]
    pub tftp_file: Vec<PathBuf>,
    /// Concurrent TFTP transfers accepted.
    #[arg(long, default_value_t = 64)]
    pub max_tftp_transfers: usize,
    /// Longest one TFTP transfer may take, in seconds.
    #[arg(long, default_value_t = 300)]
    pub tftp_transfer_secs: u64,
    /// Concurrent artifact downloads accepted (past it: 503 + Retry-After).
    #[arg(long, default_value_t = 256)]
    pub max_downloads: usize,
    /// Standalone source: a TOML file of images and machines.
    #[arg(long, conflicts_with = "namespace")]
    pub config: Option<PathBuf>,
    /// Cluster source: the namespace of Machine/BootImage objects (kubeconfig from
    /// KUBECONFIG or the in-cluster service account).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Cluster source: the BootImage for machines that name none.
    #[arg(long, default_value = "default")]
    pub default_image: String,
    /// Directory of content-addressed artifacts, each served at /artifacts/sha256/<hex>.
    #[arg(long)]
    pub artifacts_dir: Option<PathBuf>,
    /// Machine API URL put on kernel command lines (tether.api=).
    #[arg(long)]
    pub api_url: Option<String>,
    /// Operator CA pin, sha256:<hex> (tether.ca=).
    #[arg(long)]
    pub ca_pin: Option<String>,
    /// File holding the enrollment token (tether.token=); a file keeps it out of `ps`.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Base URL clients use to reach our HTTP server; default http://<address>[:port].
    #[arg(long)]
    pub http_base_url: Option<String>,
}

/// Finds the iPXE binaries; a missing one is a start-up error naming where we looked.
pub fn load_ipxe(dir: Option<&Path>) -> Result<Files> {
    let dirs: Vec<PathBuf> = match dir {
        Some(d) => vec![d.to_path_buf()],
        None => DEFAULT_IPXE_DIRS.iter().map(PathBuf::from).collect(),
    };
    let mut files = Files::default();
    for name in [BIOS_FILE, EFI_FILE] {
        let found = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
        let Some(path) = found else {
            return Err(Error::MissingBootFile {
                name,
                searched: dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let data = std::fs::read(&path).map_err(Error::io("read", path.display()))?;
        files.insert(name, Bytes::from(data));
    }
    Ok(files)
}

/// The first IPv4 address of `interface`.
pub fn interface_ipv4(interface: &str) -> Result<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Io {
        op: "list addresses of",
        path: interface.into(),
        source: e.into(),
    })?;
    for a in addrs {
        if a.interface_name == interface
            && let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in())
        {
            return Ok(sin.ip());
        }
    }
    Err(Error::Config {
        path: "flags".into(),
        detail: format!("interface {interface} has no IPv4 address; pass --address"),
    })
}

/// Everything checked and loaded, ready to bind.
pub struct Prepared {
    args: ServeArgs,
    server: BootServer,
    files: Arc<Files>,
    app: Arc<App>,
    leases: Option<Leases>,
    metrics: Arc<Metrics>,
}

/// Runs every start-up check and loads sources, files and leases.
pub async fn prepare(args: ServeArgs) -> Result<Prepared> {
    let flags = |detail: String| Error::Config {
        path: "flags".into(),
        detail,
    };
    let mut files = load_ipxe(args.ipxe_dir.as_deref())?;
    for p in &args.tftp_file {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| flags(format!("--tftp-file {} has no file name", p.display())))?;
        tftp::check_file_name(name).map_err(|why| flags(format!("--tftp-file {name}: {why}")))?;
        let data = std::fs::read(p).map_err(Error::io("read", p.display()))?;
        files.insert(name, Bytes::from(data));
    }
    let ip = match (args.address, &args.interface) {
        (Some(ip), _) => ip,
        (None, Some(ifname)) => interface_ipv4(ifname)?,
        (None, None) => return Err(flags("pass --interface or --address".into())),
    };
    let http_base = match &args.http_base_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if args.http_port == 80 => format!("http://{ip}"),
        None => format!("http://{ip}:{}", args.http_port),
    };
    script::check_url("--http-base-url", &http_base)?;
    let token = match &args.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(Error::io("read", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let enroll = Enrollment {
        api_url: args.api_url.clone(),
        ca_pin: args.ca_pin.clone(),
        token,
    };
    if let Some(u) = &enroll.api_url {
        script::check_url("--api-url", u)?;
    }
    if let Some(p) = &enroll.ca_pin {
        script::check_ca_pin(p)?;
    }
    if let Some(t) = &enroll.token {
        script::check_token(t)?;
    }
    let mut store = Store::default();
    if let Some(d) = &args.artifacts_dir {
        let n = store.add_dir(d)?;
        tracing::info!(dir = %d.display(), files = n, "artifact store loaded");
    }
    let source: Arc<dyn BootSource> = match (&args.config, &args.namespace) {
        (Some(path), _) => Arc::new(ConfigSource::load(path, &mut store)?),
        (None, Some(ns)) => {
            let client = kube::Client::try_default()
                .await
                .map_err(Error::kube("connect to the management cluster"))?;
            Arc::new(KubeSource::new(client, ns, &args.default_image))
        }
        (None, None) => return Err(flags("pass --config FILE or --namespace NS".into())),
    };
    let leases = if args.full_dhcp && !args.no_dhcp {
        let pool = Pool {
            start: args.pool_start.expect("clap requires --pool-start"),
            end: args.pool_end.expect("clap requires --pool-end"),
            netmask: args.netmask,
            router: args.router,
            lease_secs: args.lease_secs,
        };
        if let Some(dir) = args.lease_file.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io("create", dir.display()))?;
        }
        Some(Leases::load(pool, &args.lease_file)?)
    } else {
        None
    };
    let metrics = Arc::new(Metrics::default());
    let files = Arc::new(files);
    let app = Arc::new(App {
        source,
        store,
        files: (*files).clone(),
        http_base: http_base.clone(),
        enroll,
        metrics: metrics.clone(),
        artifact_slots: Arc::new(Semaphore::new(args.max_downloads)),
    });
    Ok(Prepared {
        server: BootServer { ip, http_base },
        args,
        files,
        app,
        leases,
        metrics,
    })
}

/// Binds every socket and serves until `shutdown` flips to true; then stops accepting,
/// lets HTTP connections finish (bounded) and returns.
pub async fn run(p: Prepared, shutdown: watch::Receiver<bool>) -> Result<()> {
    let a = &p.args;
    let mut tasks = tokio::task::JoinSet::new();
    if !a.no_dhcp {
        let ifname = a.interface.as_deref();
        let s67 = dhcp::server::bind(Ipv4Addr::UNSPECIFIED, a.dhcp_port, ifname)?;
        tasks.spawn(dhcp::server::serve(
            s67,
            Port::Dhcp,
            p.server.clone(),
            p.leases,
            a.dhcp_client_port,
            p.metrics.clone(),
            shutdown.clone(),
        ));
        let s4011 = dhcp::server::bind(Ipv4Addr::UNSPECIFIED, a.proxy_port, ifname)?;
        tasks.spawn(dhcp::server::serve(
            s4011,
            Port::ProxyDhcp,
            p.server.clone(),
            None,
            a.dhcp_client_port,
            p.metrics.clone(),
            shutdown.clone(),
        ));
    }
    let tftp_addr = SocketAddr::new(a.listen, a.tftp_port);
    let tftp_sock = UdpSocket::bind(tftp_addr)
        .await
        .map_err(Error::io("bind TFTP", tftp_addr))?;
    tasks.spawn(tftp::server::serve(
        tftp_sock,
        p.files.clone(),
        tftp::server::Limits {
            max_transfers: a.max_tftp_transfers,
            max_duration: Duration::from_secs(a.tftp_transfer_secs),
        },
        p.metrics.clone(),
        shutdown.clone(),
    ));
    let http_addr = SocketAddr::new(a.listen, a.http_port);
    let listener = TcpListener::bind(http_addr)
        .await
        .map_err(Error::io("bind HTTP", http_addr))?;
    tasks.spawn(http::serve(listener, p.app.clone(), shutdown.clone()));
    tracing::info!(
        address = %p.server.ip,
        http = %p.server.http_base,
        mode = if a.no_dhcp { "no-dhcp" } else if a.full_dhcp { "full-dhcp" } else { "proxy-dhcp" },
        "tether-pxe serving"
    );
    while tasks.join_next().await.is_some() {}
    tracing::info!("tether-pxe stopped");
    Ok(())
}
