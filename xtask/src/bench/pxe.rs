//! `cargo xtask bench pxe`: tether-pxe against the reference tools, side by side in one run,
//! in network namespaces this benchmark creates: the servers on bridge `br0` (10.97.0.1),
//! the clients in a second namespace wired to the bridge by a veth pair (10.97.0.2).
//!
//! - DHCP: proxyDHCP offers per second for PXE DISCOVERs (a closed loop with 32 requests in
//!   flight, 5 s) vs dnsmasq in proxy mode (`--dhcp-range=…,proxy` + `--pxe-service`).
//! - TFTP: time to fetch a 1 MB and a 30 MB file, lock-step at blksize 1468 (dnsmasq has no
//!   windowsize, so neither side gets one), median of 5, vs dnsmasq's TFTP server.
//! - HTTP: artifact throughput with 64 concurrent keep-alive clients, each fetching an 8 MiB
//!   file 8 times, vs nginx (sendfile on, 2 workers) serving the same file.
//!
//! - Boot storm: 500 simulated machines power on at once — iPXE DISCOVER → proxy offer →
//!   boot script with a fresh boot token (the cluster source against a real kube-apiserver
//!   started inside the server namespace, so the tokens are real Secrets) → beacon → kernel
//!   and initrd (Debian's, from /boot), each a real HTTP GET whose every byte is checked:
//!   all answered, time to the last byte, 0 failures, one token and one Machine each.
//!
//! Every loop is bounded in count and time; all traffic stays inside the namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhcproto::v4::MessageType;
use tether_boot::Mac;
use tether_pxe::dhcp;
use tether_pxe::tftp::{self, Packet};
use tether_testkit::NetNs;

use crate::error::Error;

const SERVER: &str = "10.97.0.1";
const BLKSIZE: usize = 1468;
const HTTP_CLIENTS: usize = 64;
const HTTP_ROUNDS: usize = 8;
const ARTIFACT_MB: usize = 8;
const DHCP_SECS: u64 = 5;

fn step(step: &str, detail: impl std::fmt::Display) -> Error {
    Error::Step {
        step: step.into(),
        detail: detail.to_string(),
    }
}

/// A server process, stopped with SIGTERM (then SIGKILL) on drop.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut cmd: Command, log: &Path) -> Result<Server, Error> {
    let err = std::fs::File::create(log).map_err(|e| step("create log", e))?;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(|e| step(&format!("start {cmd:?}"), e))?;
    Ok(Server(child))
}

/// Runs `f` on a thread that has joined `ns`'s network namespace (threads it spawns inherit).
fn in_ns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .map_err(|_| step("benchmark thread", "panicked"))
}

fn wait_tcp(ns: &NetNs, port: u16) -> Result<(), Error> {
    let ok = in_ns(ns, move || {
        let addr: SocketAddr = format!("{SERVER}:{port}").parse().unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })?;
    ok.then_some(())
        .ok_or_else(|| step("wait for server", format!("nothing listens on {port}")))
}

/// Proxy offers per second: DISCOVERs broadcast from the client side with `window` in flight.
fn dhcp_rate() -> f64 {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(b"vc0")).unwrap();
    s.bind(&SocketAddr::from(([0, 0, 0, 0], 68)).into())
        .unwrap();
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let dest: SocketAddr = "255.255.255.255:67".parse().unwrap();
    let requests: Vec<Vec<u8>> = (0..256u32)
        .map(|i| {
            let mac = Mac([0x52, 0x54, 0, 0xbe, (i >> 8) as u8, i as u8]);
            let mut m = dhcp::client_request(
                mac,
                MessageType::Discover,
                Some(b"PXEClient:Arch:00000:UNDI:002001"),
                Some(0),
                None,
            );
            m.set_xid(0xbe00_0000 | i);
            dhcp::encode(&m).unwrap()
        })
        .collect();
    let window = 32usize;
    let mut buf = [0u8; 1500];
    let mut outstanding = 0usize;
    let mut sent = 0usize;
    let mut offers = 0u64;
    let mut send_errors = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs(DHCP_SECS);
    while Instant::now() < end {
        while outstanding < window {
            if sock
                .send_to(&requests[sent % requests.len()], dest)
                .is_err()
            {
                send_errors += 1;
            }
            sent += 1;
            outstanding += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Ok(m) = dhcp::parse(&buf[..n])
                    && m.opts().msg_type() == Some(MessageType::Offer)
                    && m.xid() & 0xff00_0000 == 0xbe00_0000
                {
                    offers += 1;
                    outstanding = outstanding.saturating_sub(1);
                }
            }
            // Lost in flight (queue overflow): refill the window.
            Err(_) => outstanding = 0,
        }
    }
    assert!(
        offers > 0,
        "no DHCP offers received ({sent} sent, {send_errors} send errors)"
    );
    offers as f64 / start.elapsed().as_secs_f64()
}

/// Fetches `file` lock-step at BLKSIZE; returns the time taken and the bytes received.
fn tftp_fetch(file: &str) -> (Duration, usize) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let server: SocketAddr = format!("{SERVER}:69").parse().unwrap();
    let start = Instant::now();
    let rrq = tftp::rrq_packet(file, &[("blksize", &BLKSIZE.to_string())]);
    s.send_to(&rrq, server).unwrap();
    let mut buf = vec![0u8; BLKSIZE + 64];
    let mut expect: u16 = 1;
    let mut got = 0usize;
    let mut last_ack: Option<([u8; 4], SocketAddr)> = None;
    while start.elapsed() < Duration::from_secs(120) {
        let (n, from) = match s.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => {
                match last_ack {
                    Some((a, to)) => s.send_to(&a, to).unwrap(),
                    None => s.send_to(&rrq, server).unwrap(),
                };
                continue;
            }
        };
        match Packet::parse(&buf[..n]) {
            Ok(Packet::Oack(_)) => {
                let a = tftp::ack_packet(0);
                s.send_to(&a, from).unwrap();
                last_ack = Some((a, from));
            }
            Ok(Packet::Data { block, data }) => {
                let a = tftp::ack_packet(block);
                if block == expect {
                    got += data.len();
                    expect = expect.wrapping_add(1);
                    s.send_to(&a, from).unwrap();
                    last_ack = Some((a, from));
                    if data.len() < BLKSIZE {
                        return (start.elapsed(), got);
                    }
                }
            }
            Ok(Packet::Error { message, .. }) => panic!("tftp error from server: {message}"),
            _ => {}
        }
    }
    panic!("tftp fetch of {file} did not finish in 120 s");
}

fn tftp_median(file: &str, want: usize) -> Duration {
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let (t, n) = tftp_fetch(file);
            assert_eq!(n, want, "{file}: wrong size");
            t
        })
        .collect();
    times.sort();
    times[2]
}

/// 64 keep-alive clients × HTTP_ROUNDS GETs of `path`; returns bytes per second.
fn http_throughput(port: u16, path: &str, size: usize) -> f64 {
    let start = Instant::now();
    let threads: Vec<_> = (0..HTTP_CLIENTS)
        .map(|_| {
            let path = path.to_string();
            std::thread::spawn(move || {
                let stream = TcpStream::connect((SERVER, port)).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::with_capacity(256 * 1024, stream);
                let mut sink = vec![0u8; 256 * 1024];
                let mut total = 0usize;
                for _ in 0..HTTP_ROUNDS {
                    write!(w, "GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
                    let mut len = None;
                    loop {
                        let mut line = String::new();
                        r.read_line(&mut line).unwrap();
                        if line == "\r\n" || line.is_empty() {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse::<usize>().ok();
                        }
                    }
                    let mut left = len.expect("content-length");
                    assert_eq!(left, size);
                    while left > 0 {
                        let n = r.read(&mut sink[..left.min(256 * 1024)]).unwrap();
                        assert!(n > 0, "early EOF");
                        left -= n;
                        total += n;
                    }
                }
                total
            })
        })
        .collect();
    let bytes: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn random_file(path: &Path, size: usize) -> Result<(), Error> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ size as u64;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).map_err(|e| step("write bench file", e))
}

fn release_binary() -> Result<PathBuf, Error> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = crate::steps::cargo()
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "tether-pxe",
            "--bin",
            "tether-pxe",
        ])
        .current_dir(&root)
        .status()
        .map_err(|e| step("cargo build --release -p tether-pxe", e))?;
    if !st.success() {
        return Err(step("cargo build --release -p tether-pxe", st));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/tether-pxe"))
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

/// Runs the PXE benchmark and prints Markdown rows.
pub fn run() -> Result<(), Error> {
    for tool in ["dnsmasq", "nginx"] {
        if Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(step(
                "bench pxe",
                format!("{tool} missing: cargo xtask deps installs it"),
            ));
        }
    }
    let pxe = release_binary()?;
    let tmp = tempfile::tempdir().map_err(|e| step("temp dir", e))?;
    let d = tmp.path().to_path_buf();
    let tftp_root = d.join("tftp");
    std::fs::create_dir_all(&tftp_root).map_err(|e| step("mkdir", e))?;
    let (one, thirty) = (1_000_000usize, 30_000_000usize);
    random_file(&tftp_root.join("one.bin"), one)?;
    random_file(&tftp_root.join("thirty.bin"), thirty)?;
    for f in ["undionly.kpxe", "ipxe.efi"] {
        std::fs::copy(Path::new("/usr/lib/ipxe").join(f), tftp_root.join(f))
            .map_err(|e| step("copy iPXE binaries (install ipxe)", e))?;
    }
    let art_dir = d.join("artifacts");
    std::fs::create_dir_all(&art_dir).map_err(|e| step("mkdir", e))?;
    let art_size = ARTIFACT_MB << 20;
    random_file(&art_dir.join("blob"), art_size)?;
    let (hex, _) = tether_pxe::artifacts::hash_file(&art_dir.join("blob"))
        .map_err(|e| step("hash artifact", e))?;
    let www = d.join("www/artifacts/sha256");
    std::fs::create_dir_all(&www).map_err(|e| step("mkdir", e))?;
    std::fs::hard_link(art_dir.join("blob"), www.join(&hex)).map_err(|e| step("link", e))?;
    let config = d.join("pxe.toml");
    std::fs::write(
        &config,
        format!(
            "default_image = \"b\"\n[images.b]\nversion = \"1\"\nkernel = \"{}\"\n",
            art_dir.join("blob").display()
        ),
    )
    .map_err(|e| step("write config", e))?;

    let ns = NetNs::create()?;
    ns.add_bridge("br0", Some(&format!("{SERVER}/24")))?;
    // Clients live in their own namespace: a packet arriving with a source address that is
    // local to the receiving namespace would be dropped as martian.
    let client_ns = NetNs::create()?;
    ns.add_veth("vb0", "vc0", Some(&client_ns), Some("br0"))?;
    client_ns.add_address("vc0", "10.97.0.2/24")?;

    println!("| case | tether-pxe | reference | ratio (≥ 1 = tether-pxe better) |");
    println!("|---|---|---|---|");

    // tether-pxe: proxy DHCP + TFTP + HTTP.
    let mut cmd = ns.command(&pxe);
    cmd.args([
        "serve",
        "--interface",
        "br0",
        "--log-level",
        "warn",
        "--http-port",
        "8080",
    ])
    .arg("--ipxe-dir")
    .arg(&tftp_root)
    .arg("--tftp-file")
    .arg(tftp_root.join("one.bin"))
    .arg("--tftp-file")
    .arg(tftp_root.join("thirty.bin"))
    .arg("--config")
    .arg(&config);
    let (t_dhcp, t_one, t_thirty, t_http) = {
        let _srv = spawn(cmd, &d.join("tether-pxe.log"))?;
        wait_tcp(&client_ns, 8080)?;
        let path = format!("/artifacts/sha256/{hex}");
        in_ns(&client_ns, move || {
            (
                dhcp_rate(),
                tftp_median("one.bin", one),
                tftp_median("thirty.bin", thirty),
                http_throughput(8080, &path, art_size),
            )
        })?
    };

    // dnsmasq: proxy DHCP + TFTP.
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--port=0",
        "--interface=br0",
        "--bind-interfaces",
        "--dhcp-range=10.97.0.0,proxy,255.255.255.0",
        "--pxe-service=x86PC,PXE,undionly",
        "--enable-tftp",
        "--quiet-dhcp",
        "--quiet-tftp",
        "--user=root",
        "--log-facility=/dev/null",
    ])
    .arg(format!("--tftp-root={}", tftp_root.display()))
    .arg(format!("--pid-file={}", d.join("dnsmasq.pid").display()))
    .arg(format!(
        "--dhcp-leasefile={}",
        d.join("dnsmasq.leases").display()
    ));
    let (r_dhcp, r_one, r_thirty) = {
        let _srv = spawn(cmd, &d.join("dnsmasq.log"))?;
        std::thread::sleep(Duration::from_secs(1));
        in_ns(&client_ns, move || {
            (
                dhcp_rate(),
                tftp_median("one.bin", one),
                tftp_median("thirty.bin", thirty),
            )
        })?
    };

    // nginx: the same artifact.
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nuser root;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n\
               client_body_temp_path {d}/ntmp; proxy_temp_path {d}/ntmp; fastcgi_temp_path {d}/ntmp;\n\
               uwsgi_temp_path {d}/ntmp; scgi_temp_path {d}/ntmp;\n\
               server {{ listen {SERVER}:8081; root {d}/www; }} }}\n",
            d = d.display()
        ),
    )
    .map_err(|e| step("write nginx.conf", e))?;
    let mut cmd = ns.command("nginx");
    cmd.arg("-c").arg(&conf).arg("-p").arg(&d);
    let r_http = {
        let _srv = spawn(cmd, &d.join("nginx.log"))?;
        wait_tcp(&client_ns, 8081)?;
        let path = format!("/artifacts/sha256/{hex}");
        in_ns(&client_ns, move || http_throughput(8081, &path, art_size))?
    };

    println!(
        "| DHCP proxy offers/s (PXE DISCOVER, 32 in flight, {DHCP_SECS} s) | {t_dhcp:.0} | dnsmasq {r_dhcp:.0} | {} |",
        ratio(t_dhcp, r_dhcp)
    );
    for (name, t, r) in [("1 MB", t_one, r_one), ("30 MB", t_thirty, r_thirty)] {
        println!(
            "| TFTP {name}, blksize {BLKSIZE}, lock-step (median of 5) | {:.1} ms | dnsmasq {:.1} ms | {} |",
            t.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            ratio(r.as_secs_f64(), t.as_secs_f64())
        );
    }
    println!(
        "| HTTP {ARTIFACT_MB} MiB artifact, {HTTP_CLIENTS} clients × {HTTP_ROUNDS} | {:.0} MB/s | nginx {:.0} MB/s | {} |",
        t_http / 1e6,
        r_http / 1e6,
        ratio(t_http, r_http)
    );

    let storm = boot_storm(&pxe, &d, &ns, &client_ns);
    if storm.is_err() {
        // Keep the logs of a failed storm.
        let kept = tmp.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    storm
}

// ---------------------------------------------------------------------------------------
// Boot storm: STORM_MACHINES simulated machines power on at once.

/// Machines in the boot storm.
const STORM_MACHINES: usize = 500;
/// The whole storm must end within this.
const STORM_LIMIT: Duration = Duration::from_secs(300);
/// DISCOVER retransmissions per machine (iPXE backs off 1, 2, 4… s; we resend each second).
const STORM_DISCOVER_TRIES: u32 = 8;
/// 503 + Retry-After retries per download (iPXE honours Retry-After too).
const STORM_HTTP_RETRIES: u32 = 20;

/// What one simulated machine went through.
#[derive(Debug, Default)]
struct MachineRun {
    /// When its last byte arrived, since the storm began.
    done: Option<Duration>,
    /// The boot token its script carried.
    token: Option<String>,
    /// 503 + Retry-After answers it waited out.
    retries: u32,
    /// Bytes of kernel + initrd received and checked.
    bytes: u64,
    /// Why it failed, if it did.
    error: Option<String>,
}

/// What the storm left in the cluster: Machines, boot-token Secrets, each token's (id, MAC).
type StormCounts = (usize, usize, Vec<(String, String)>);
/// Checks a body chunk (offset, bytes) as it arrives.
type ChunkCheck<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), String>;

/// The cluster side of the storm, on a thread inside the server namespace (so that etcd,
/// kube-apiserver and their loopback ports are the namespace's): start, set up, hand over
/// the kubeconfig, then on request count what the storm created.
struct StormCluster {
    kubeconfig: PathBuf,
    verify: std::sync::mpsc::Sender<()>,
    counts: std::sync::mpsc::Receiver<Result<StormCounts, String>>,
    thread: std::thread::JoinHandle<()>,
}

fn storm_cluster(
    ns: &NetNs,
    kernel: (String, u64),
    initrd: (String, u64),
) -> Result<StormCluster, Error> {
    use std::sync::mpsc::channel;
    let (ready_tx, ready_rx) = channel::<Result<PathBuf, String>>();
    let (verify_tx, verify_rx) = channel::<()>();
    let (counts_tx, counts_rx) = channel();
    let path = ns.path();
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let cluster = match tether_testkit::TestCluster::start().await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            if let Err(e) = storm_setup(&cluster.client(), kernel, initrd).await {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(cluster.kubeconfig().to_path_buf()));
            if verify_rx.recv().is_err() {
                return;
            }
            let _ = counts_tx.send(storm_count(&cluster.client()).await);
        });
    });
    let kubeconfig = ready_rx
        .recv()
        .map_err(|_| step("storm cluster", "its thread ended"))?
        .map_err(|e| step("storm cluster", e))?;
    Ok(StormCluster {
        kubeconfig,
        verify: verify_tx,
        counts: counts_rx,
        thread,
    })
}

/// CRDs, the operator namespace, the machine API ConfigMap, the default BootImage.
async fn storm_setup(
    client: &kube::Client,
    kernel: (String, u64),
    initrd: (String, u64),
) -> Result<(), String> {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    use kube::{CustomResourceExt, ResourceExt};
    use tether_api::machine_api::{CONFIG_MAP, KEY_CA_PIN, KEY_URL, NAMESPACE};
    use tether_api::{Artifact, BootImage, BootImageSpec, Machine};
    let e = |what: &str| {
        let what = what.to_string();
        move |err: kube::Error| format!("{what}: {err}")
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [Machine::crd(), BootImage::crd()] {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("tether-bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(e("apply CRD"))?;
        let start = Instant::now();
        loop {
            let c = crds.get(&name).await.map_err(e("get CRD"))?;
            let established = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("CRD {name} not Established after 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut ns = Namespace::default();
    ns.metadata.name = Some(NAMESPACE.into());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .map_err(e("create namespace"))?;
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(CONFIG_MAP.into());
    cm.data = Some(
        [
            (KEY_URL.to_string(), "https://10.97.0.1:9443".to_string()),
            (
                KEY_CA_PIN.to_string(),
                format!("sha256:{}", "5a".repeat(32)),
            ),
        ]
        .into(),
    );
    Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &cm)
        .await
        .map_err(e("create ConfigMap"))?;
    let art = |(sha256, size): (String, u64)| Artifact {
        url: format!("http://images.invalid/{sha256}"),
        sha256,
        size,
    };
    let spec = BootImageSpec {
        version: "storm-1".into(),
        artifacts: [
            ("kernel".to_string(), art(kernel)),
            ("initrd".to_string(), art(initrd)),
        ]
        .into(),
        cmdline: "console=ttyS0".into(),
        manifest_signature: None,
    };
    Api::<BootImage>::all(client.clone())
        .create(&PostParams::default(), &BootImage::new("default", spec))
        .await
        .map_err(e("create BootImage"))?;
    Ok(())
}

/// Machines, boot-token Secrets, and each token's (id, bound MAC).
async fn storm_count(client: &kube::Client) -> Result<StormCounts, String> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, ListParams};
    use tether_api::Machine;
    use tether_api::machine_api::NAMESPACE;
    use tether_api::token::{KIND_LABEL, TokenRecord};
    let machines = Api::<Machine>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list Machines: {e}"))?
        .items
        .len();
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&format!("{KIND_LABEL}=boot")))
        .await
        .map_err(|e| format!("list boot tokens: {e}"))?
        .items;
    let mut bound = Vec::new();
    for s in &secrets {
        let r = TokenRecord::from_secret(s)?;
        bound.push((r.id, r.mac.map(|m| m.to_string()).unwrap_or_default()));
    }
    Ok((machines, secrets.len(), bound))
}

/// One GET on a fresh connection; returns the status, the Retry-After seconds, and the
/// body, which `check` sees chunk by chunk (offset, bytes) instead when given.
fn storm_get(
    url: &str,
    mut check: Option<ChunkCheck>,
) -> Result<(u16, Option<u64>, Vec<u8>, u64), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not http"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send {url}: {e}"))?;
    let mut r = BufReader::with_capacity(256 * 1024, s);
    let mut status_line = String::new();
    r.read_line(&mut status_line)
        .map_err(|e| format!("{url}: {e}"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{url}: bad status line {status_line:?}"))?;
    let (mut len, mut retry) = (None, None);
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| format!("{url}: {e}"))?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse::<u64>().ok();
        } else if let Some(v) = lower.strip_prefix("retry-after:") {
            retry = v.trim().parse::<u64>().ok();
        }
    }
    let len = len.ok_or_else(|| format!("{url}: no content-length"))?;
    let mut body = Vec::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while got < len {
        let want = (len - got).min(buf.len() as u64) as usize;
        let n = r
            .read(&mut buf[..want])
            .map_err(|e| format!("{url}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "{url}: connection closed after {got} of {len} bytes"
            ));
        }
        match check.as_mut() {
            Some(f) if status == 200 => f(got, &buf[..n])?,
            _ => body.extend_from_slice(&buf[..n]),
        }
        got += n as u64;
    }
    Ok((status, retry, body, got))
}

/// GETs an artifact, waiting out 503 + Retry-After, and checks every byte against `want`.
fn storm_download(url: &str, want: &[u8], retries: &mut u32) -> Result<u64, String> {
    loop {
        let mut check = |off: u64, chunk: &[u8]| -> Result<(), String> {
            let off = off as usize;
            if want.get(off..off + chunk.len()) == Some(chunk) {
                Ok(())
            } else {
                Err(format!("{url}: bytes at {off} differ from the artifact"))
            }
        };
        let (status, retry, body, got) = storm_get(url, Some(&mut check))?;
        match (status, retry) {
            (200, _) if got == want.len() as u64 => return Ok(got),
            (200, _) => return Err(format!("{url}: {got} bytes, want {}", want.len())),
            (503, Some(secs)) if *retries < STORM_HTTP_RETRIES => {
                *retries += 1;
                std::thread::sleep(Duration::from_secs(secs));
            }
            _ => {
                return Err(format!(
                    "{url}: status {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
        }
    }
}

/// One machine after its DHCP answer: script, beacon, kernel, initrd.
fn storm_machine(script_url: &str, kernel: &[u8], initrd: &[u8], begun: Instant) -> MachineRun {
    let mut run = MachineRun::default();
    let result = (|| -> Result<(), String> {
        let (status, _, body, _) = storm_get(script_url, None)?;
        let script = String::from_utf8_lossy(&body).into_owned();
        if status != 200 || !script.starts_with("#!ipxe\n") {
            return Err(format!("script: status {status}: {script}"));
        }
        let word = |prefix: &str| {
            script
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
                .ok_or_else(|| format!("no {prefix:?} in the script"))
        };
        run.token = script
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tether.token="))
            .map(str::to_string);
        if run.token.is_none() {
            return Err("the script carries no boot token".into());
        }
        let beacon = word("imgfetch --name beacon ")?;
        storm_get(&beacon, None)?;
        let k = word("kernel --name kernel ")?;
        let i = word("initrd --name initrd ")?;
        run.bytes += storm_download(&k, kernel, &mut run.retries)?;
        run.bytes += storm_download(&i, initrd, &mut run.retries)?;
        Ok(())
    })();
    match result {
        Ok(()) => run.done = Some(begun.elapsed()),
        Err(e) => run.error = Some(e),
    }
    run
}

/// The storm from the client namespace: every machine broadcasts an iPXE DISCOVER at once;
/// one socket collects the proxy offers (resending DISCOVERs for machines still waiting,
/// each second) and hands each machine the script URL from its option 67.
fn storm_clients(kernel: Arc<Vec<u8>>, initrd: Arc<Vec<u8>>) -> (Vec<MachineRun>, u32, Duration) {
    use dhcproto::v4::{DhcpOption, OptionCode};
    use std::sync::mpsc;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(b"vc0")).unwrap();
    s.set_recv_buffer_size(4 << 20).unwrap();
    s.bind(&SocketAddr::from(([0, 0, 0, 0], 68)).into())
        .unwrap();
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let dest: SocketAddr = "255.255.255.255:67".parse().unwrap();
    let xid = |i: usize| 0x5707_0000u32 | i as u32;
    let discover = |i: usize| {
        let mac = Mac([0x52, 0x54, 0x01, 0x57, (i >> 8) as u8, i as u8]);
        let mut m = dhcp::client_request(
            mac,
            MessageType::Discover,
            Some(b"PXEClient:Arch:00000:UNDI:002001"),
            Some(0),
            Some(b"iPXE"),
        );
        m.set_xid(xid(i));
        dhcp::encode(&m).unwrap()
    };
    let begun = Instant::now();
    let mut senders = Vec::new();
    let mut machines = Vec::new();
    for _ in 0..STORM_MACHINES {
        let (tx, rx) = mpsc::channel::<String>();
        senders.push(Some(tx));
        let (kernel, initrd) = (kernel.clone(), initrd.clone());
        machines.push(std::thread::spawn(move || {
            match rx.recv_timeout(STORM_LIMIT) {
                Ok(url) => storm_machine(&url, &kernel, &initrd, begun),
                Err(_) => MachineRun {
                    error: Some("no DHCP offer".into()),
                    ..MachineRun::default()
                },
            }
        }));
    }
    let mut tries = vec![0u32; STORM_MACHINES];
    let mut resent = 0u32;
    let mut waiting = STORM_MACHINES;
    let mut last_round = Instant::now() - Duration::from_secs(1);
    let mut buf = [0u8; 1500];
    while waiting > 0 && begun.elapsed() < STORM_LIMIT {
        if last_round.elapsed() >= Duration::from_secs(1) {
            last_round = Instant::now();
            for i in 0..STORM_MACHINES {
                if senders[i].is_some() && tries[i] < STORM_DISCOVER_TRIES {
                    if tries[i] > 0 {
                        resent += 1;
                    }
                    tries[i] += 1;
                    let _ = sock.send_to(&discover(i), dest);
                }
            }
            if (0..STORM_MACHINES).all(|i| senders[i].is_none() || tries[i] >= STORM_DISCOVER_TRIES)
                && last_round.duration_since(begun)
                    > Duration::from_secs(STORM_DISCOVER_TRIES as u64)
            {
                break;
            }
        }
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(m) = dhcp::parse(&buf[..n]) else {
            continue;
        };
        let i = (m.xid() & 0xffff) as usize;
        if m.xid() & 0xffff_0000 != 0x5707_0000 || i >= STORM_MACHINES {
            continue;
        }
        if let Some(DhcpOption::BootfileName(f)) = m.opts().get(OptionCode::BootfileName)
            && let Some(tx) = senders[i].take()
        {
            let _ = tx.send(String::from_utf8_lossy(f).into_owned());
            waiting -= 1;
        }
    }
    drop(senders);
    let runs = machines
        .into_iter()
        .map(|t| {
            t.join().unwrap_or_else(|_| MachineRun {
                error: Some("machine thread panicked".into()),
                ..MachineRun::default()
            })
        })
        .collect();
    (runs, resent, begun.elapsed())
}

/// Runs the boot storm: a real apiserver (cluster source, real boot-token Secrets),
/// tether-pxe in proxy mode, STORM_MACHINES clients. Prints a Markdown table.
fn boot_storm(pxe: &Path, d: &Path, ns: &NetNs, client_ns: &NetNs) -> Result<(), Error> {
    let newest = |prefix: &str| -> Result<PathBuf, Error> {
        let mut v: Vec<PathBuf> = std::fs::read_dir("/boot")
            .map_err(|e| step("read /boot", e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .collect();
        v.sort();
        v.pop().ok_or_else(|| {
            step(
                "boot storm",
                format!("no /boot/{prefix}* (install linux-image-amd64)"),
            )
        })
    };
    let art_dir = d.join("storm-artifacts");
    std::fs::create_dir_all(&art_dir).map_err(|e| step("mkdir", e))?;
    let mut loaded = Vec::new();
    for (name, src) in [
        ("vmlinuz", newest("vmlinuz-")?),
        ("initrd.img", newest("initrd.img-")?),
    ] {
        let dst = art_dir.join(name);
        std::fs::copy(&src, &dst).map_err(|e| step(&format!("copy {}", src.display()), e))?;
        let (sha, size) =
            tether_pxe::artifacts::hash_file(&dst).map_err(|e| step("hash artifact", e))?;
        let bytes = std::fs::read(&dst).map_err(|e| step("read artifact", e))?;
        loaded.push(((sha, size), Arc::new(bytes)));
    }
    let ((k_ref, kernel), (i_ref, initrd)) = (loaded.remove(0), loaded.remove(0));
    let cluster = storm_cluster(ns, k_ref, i_ref)?;
    let mut cmd = ns.command(pxe);
    cmd.args([
        "serve",
        "--interface",
        "br0",
        "--cluster",
        "--log-level",
        "info",
        "--http-port",
        "8082",
        "--tftp-port",
        "6969",
    ])
    .arg("--ipxe-dir")
    .arg(d.join("tftp"))
    .arg("--artifacts-dir")
    .arg(&art_dir)
    .env("KUBECONFIG", &cluster.kubeconfig);
    let (runs, resent, wall) = {
        let _srv = spawn(cmd, &d.join("tether-pxe-storm.log"))?;
        wait_tcp(client_ns, 8082)?;
        let (k, i) = (kernel.clone(), initrd.clone());
        in_ns(client_ns, move || storm_clients(k, i))?
    };
    let _ = cluster.verify.send(());
    let counts = cluster
        .counts
        .recv()
        .map_err(|_| step("storm cluster", "no counts"))?
        .map_err(|e| step("count what the storm created", e));
    let _ = cluster.thread.join();
    let (machines, secrets, bound) = counts?;

    let ok: Vec<&MachineRun> = runs.iter().filter(|r| r.done.is_some()).collect();
    let failed: Vec<&MachineRun> = runs.iter().filter(|r| r.error.is_some()).collect();
    let mut times: Vec<Duration> = ok.iter().filter_map(|r| r.done).collect();
    times.sort();
    let last = times.last().copied().unwrap_or_default();
    let p50 = times.get(times.len() / 2).copied().unwrap_or_default();
    let bytes: u64 = runs.iter().map(|r| r.bytes).sum();
    let retries: u32 = runs.iter().map(|r| r.retries).sum();
    let tokens: std::collections::BTreeSet<&str> =
        runs.iter().filter_map(|r| r.token.as_deref()).collect();
    let ids: std::collections::BTreeMap<&str, &str> = bound
        .iter()
        .map(|(id, mac)| (id.as_str(), mac.as_str()))
        .collect();
    let recorded = tokens
        .iter()
        .filter(|t| t.split('.').next().is_some_and(|id| ids.contains_key(id)))
        .count();
    println!();
    println!(
        "Boot storm: {STORM_MACHINES} machines (iPXE DISCOVER → proxy offer → script with a fresh boot token → beacon → kernel {:.1} MB + initrd {:.1} MB), cluster source on a real kube-apiserver:",
        kernel.len() as f64 / 1e6,
        initrd.len() as f64 / 1e6
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| machines answered and fully booted | {} / {STORM_MACHINES} |",
        ok.len()
    );
    println!("| failures | {} |", failed.len());
    println!("| time to the last byte | {:.2} s |", last.as_secs_f64());
    println!("| median machine done after | {:.2} s |", p50.as_secs_f64());
    println!(
        "| bytes checked | {:.2} GB ({:.2} GB/s over the storm) |",
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / last.as_secs_f64().max(1e-9)
    );
    println!("| DISCOVERs resent (no offer within 1 s) | {resent} |");
    println!("| downloads that waited out 503 + Retry-After | {retries} |");
    println!(
        "| distinct boot tokens / recorded as Secrets / boot-token Secrets | {} / {recorded} / {secrets} |",
        tokens.len()
    );
    println!("| Machines discovered | {machines} |");
    println!(
        "| wall time incl. thread start | {:.2} s |",
        wall.as_secs_f64()
    );
    if let Some(f) = failed.first() {
        eprintln!(
            "first failure: {}",
            f.error.as_deref().unwrap_or("(no detail)")
        );
    }
    let all_bound = bound.iter().all(|(_, mac)| mac.starts_with("52:54:01:57:"));
    if !failed.is_empty()
        || ok.len() != STORM_MACHINES
        || tokens.len() != STORM_MACHINES
        || recorded != STORM_MACHINES
        || machines != STORM_MACHINES
        || !all_bound
    {
        return Err(step(
            "boot storm",
            format!(
                "{} of {STORM_MACHINES} booted, {} failed, {} tokens ({recorded} recorded), {machines} Machines; log: {}",
                ok.len(),
                failed.len(),
                tokens.len(),
                d.join("tether-pxe-storm.log").display()
            ),
        ));
    }
    Ok(())
}
