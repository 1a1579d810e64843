//! `tether-pxe serve`: flags, start-up checks and the wiring of DHCP, TFTP and HTTP.
//!
//! Everything that can be wrong is checked before any socket opens: the iPXE binaries exist,
//! the configuration parses and its files hash, the enrollment values are safe to put on a
//! kernel command line, every DHCP reply fits, the lease book parses.
//!
//! The serving tasks run under [`supervise`]: one that ends, fails or panics while the
//! server is meant to be up stops the whole process with an error naming it, so that a
//! supervisor (systemd, the kubelet) restarts a whole server rather than leaving one that
//! answers HTTP but no longer DHCP.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use futures::FutureExt;
use futures::future::BoxFuture;
use tether_boot::{CaPin, Token};
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};

use crate::artifacts::Store;
use crate::dhcp::leases::{Leases, Pool};
use crate::dhcp::{self, BIOS_FILE, BootServer, EFI_FILE, Port};
use crate::error::{Error, Result};
use crate::http::{self, App};
use crate::metrics::Metrics;
use crate::recent::{self, RecentMacs};
use crate::script::Enrollment;
use crate::source::kube::{GC_PERIOD, KubeOptions};
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
    #[arg(long, conflicts_with = "cluster", required_unless_present = "cluster")]
    pub config: Option<PathBuf>,
    /// Cluster source: Machine and BootImage objects of the management cluster (kubeconfig
    /// from KUBECONFIG or the in-cluster service account); mints a boot token per script.
    #[arg(long)]
    pub cluster: bool,
    /// Cluster source: the operator's namespace, where the machine API ConfigMap and the
    /// boot tokens live.
    #[arg(long, default_value = tether_api::machine_api::NAMESPACE)]
    pub namespace: String,
    /// Cluster source: the BootImage for machines that name none.
    #[arg(long, default_value = "default")]
    pub default_image: String,
    /// How long after its last DHCP request a MAC counts as on our segment (only such MACs
    /// get Machines, boot tokens and their own boot metric series).
    #[arg(long, default_value_t = 600)]
    pub seen_secs: u64,
    /// Directory of content-addressed artifacts, each served at /artifacts/sha256/<hex>.
    #[arg(long)]
    pub artifacts_dir: Option<PathBuf>,
    /// Machine API URL put on kernel command lines (tether.api=); with --cluster it
    /// overrides the ConfigMap's `url`.
    #[arg(long)]
    pub api_url: Option<String>,
    /// Machine API CA pin, sha256:<hex> (tether.ca=); with --cluster it overrides the
    /// ConfigMap's `caPin`.
    #[arg(long)]
    pub ca_pin: Option<String>,
    /// TOML source: file holding the site-wide enrollment token `<id>.<secret>` (a join
    /// token from `tether-operator token create`) put on every command line; a file keeps
    /// it out of `ps`. The cluster source mints a boot token per script instead.
    #[arg(long, conflicts_with = "cluster")]
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
    recent: Arc<RecentMacs>,
    cluster: Option<KubeSource>,
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
    tether_boot::cmdline::check_url("--http-base-url", &http_base)?;
    let server = BootServer {
        ip,
        http_base: http_base.clone(),
    };
    if !args.no_dhcp {
        dhcp::check_sizes(&server, args.full_dhcp)?;
    }
    let token = match &args.token_file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(Error::io("read", p.display()))?;
            let t: Token = text.trim().parse().map_err(|e| {
                flags(format!(
                    "--token-file {}: {e} (make one with `tether-operator token create`)",
                    p.display()
                ))
            })?;
            Some(t)
        }
        None => None,
    };
    if let Some(u) = &args.api_url {
        tether_boot::cmdline::check_url("--api-url", u)?;
    }
    let ca_pin: Option<CaPin> = args.ca_pin.as_deref().map(str::parse).transpose()?;
    let enroll = Enrollment::new(args.api_url.clone(), ca_pin, token)?;
    let mut store = Store::default();
    if let Some(d) = &args.artifacts_dir {
        let n = store.add_dir(d)?;
        tracing::info!(dir = %d.display(), files = n, "artifact store loaded");
    }
    let (source, cluster): (Arc<dyn BootSource>, Option<KubeSource>) = match &args.config {
        Some(path) => (
            Arc::new(ConfigSource::load(path, &mut store, enroll)?),
            None,
        ),
        None if args.cluster => {
            let client = kube::Client::try_default()
                .await
                .map_err(Error::kube("connect to the management cluster"))?;
            let k = KubeSource::new(
                client,
                KubeOptions {
                    namespace: args.namespace.clone(),
                    default_image: args.default_image.clone(),
                    api_url: enroll.api_url,
                    ca_pin: enroll.ca_pin,
                    server_id: ip.to_string(),
                },
            )?;
            (Arc::new(k.clone()), Some(k))
        }
        None => return Err(flags("pass --config FILE or --cluster".into())),
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
    let recent = Arc::new(RecentMacs::new(
        recent::DEFAULT_CAP,
        Duration::from_secs(args.seen_secs),
    ));
    let files = Arc::new(files);
    let app = Arc::new(App {
        source,
        store,
        files: (*files).clone(),
        http_base,
        recent: recent.clone(),
        metrics: metrics.clone(),
        artifact_slots: Arc::new(Semaphore::new(args.max_downloads)),
    });
    Ok(Prepared {
        server,
        args,
        files,
        app,
        leases,
        metrics,
        recent,
        cluster,
    })
}

/// A serving task and its name (for the error when it dies).
pub type Task = (&'static str, BoxFuture<'static, Result<()>>);

fn task(name: &'static str, f: impl Future<Output = ()> + Send + 'static) -> Task {
    (name, f.map(|()| Ok(())).boxed())
}

/// Binds every socket and serves until `shutdown` flips to true; then stops accepting,
/// lets HTTP connections finish (bounded) and returns. A task that stops on its own is an
/// error ([`supervise`]).
pub async fn run(p: Prepared, shutdown: watch::Receiver<bool>) -> Result<()> {
    let a = &p.args;
    let mut tasks: Vec<Task> = Vec::new();
    if !a.no_dhcp {
        let ifname = a.interface.as_deref();
        let s67 = dhcp::server::bind(Ipv4Addr::UNSPECIFIED, a.dhcp_port, ifname)?;
        tasks.push(task(
            "dhcp",
            dhcp::server::serve(
                s67,
                Port::Dhcp,
                p.server.clone(),
                p.leases,
                a.dhcp_client_port,
                p.recent.clone(),
                p.metrics.clone(),
                shutdown.clone(),
            ),
        ));
        let s4011 = dhcp::server::bind(Ipv4Addr::UNSPECIFIED, a.proxy_port, ifname)?;
        tasks.push(task(
            "proxy-dhcp",
            dhcp::server::serve(
                s4011,
                Port::ProxyDhcp,
                p.server.clone(),
                None,
                a.dhcp_client_port,
                p.recent.clone(),
                p.metrics.clone(),
                shutdown.clone(),
            ),
        ));
    }
    let tftp_addr = SocketAddr::new(a.listen, a.tftp_port);
    let tftp_sock = UdpSocket::bind(tftp_addr)
        .await
        .map_err(Error::io("bind TFTP", tftp_addr))?;
    tasks.push(task(
        "tftp",
        tftp::server::serve(
            tftp_sock,
            p.files.clone(),
            tftp::server::Limits {
                max_transfers: a.max_tftp_transfers,
                max_duration: Duration::from_secs(a.tftp_transfer_secs),
            },
            p.metrics.clone(),
            shutdown.clone(),
        ),
    ));
    let http_addr = SocketAddr::new(a.listen, a.http_port);
    let listener = http::bind(http_addr).map_err(Error::io("bind HTTP", http_addr))?;
    tasks.push(task(
        "http",
        http::serve(listener, p.app.clone(), shutdown.clone()),
    ));
    if let Some(k) = p.cluster {
        tasks.push(task(
            "token-gc",
            k.collect_expired_every(GC_PERIOD, shutdown.clone()),
        ));
    }
    tracing::info!(
        address = %p.server.ip,
        http = %p.server.http_base,
        mode = if a.no_dhcp { "no-dhcp" } else if a.full_dhcp { "full-dhcp" } else { "proxy-dhcp" },
        "tether-pxe serving"
    );
    supervise(tasks, shutdown).await?;
    tracing::info!("tether-pxe stopped");
    Ok(())
}

/// Runs `tasks` until each has returned after `shutdown` flipped. The first that returns
/// before (or fails, or panics) aborts the others and is the error, naming the task.
pub async fn supervise(tasks: Vec<Task>, shutdown: watch::Receiver<bool>) -> Result<()> {
    let mut set = tokio::task::JoinSet::new();
    let mut names = HashMap::new();
    for (name, fut) in tasks {
        let handle = set.spawn(fut);
        names.insert(handle.id(), name);
    }
    while let Some(joined) = set.join_next_with_id().await {
        let (id, how) = match joined {
            Ok((_, Ok(()))) if *shutdown.borrow() => continue,
            Ok((id, Ok(()))) => (id, "ended while the server was running".to_string()),
            Ok((id, Err(e))) => (id, format!("failed: {e}")),
            Err(e) if e.is_panic() => {
                let id = e.id();
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                (id, format!("panicked: {msg}"))
            }
            Err(e) => (e.id(), "was cancelled".to_string()),
        };
        set.abort_all();
        return Err(Error::TaskDied {
            task: names.get(&id).copied().unwrap_or("unnamed"),
            how,
        });
    }
    Ok(())
}

/// Prepares and serves until SIGTERM or SIGINT.
pub async fn serve_until_signal(args: ServeArgs) -> Result<()> {
    let prepared = prepare(args).await?;
    let (tx, rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::io("install", "SIGTERM handler"))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = tx.send(true);
    });
    run(prepared, rx).await
}

/// Runs `main` on a fresh runtime and returns the process's exit code: 0 when it returned
/// Ok (blocking work such as TFTP transfers gets 10 s to finish), 1 with the error logged
/// otherwise — at once, without waiting for anything still running, so that a server with
/// a dead task never lingers half alive.
pub fn exit_code(main: impl Future<Output = Result<()>>) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("start tokio runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(main) {
        Ok(()) => {
            rt.shutdown_timeout(Duration::from_secs(10));
            0
        }
        Err(e) => {
            tracing::error!("{e}");
            rt.shutdown_background();
            1
        }
    }
}
