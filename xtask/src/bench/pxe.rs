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
//! Every loop is bounded in count and time; all traffic stays inside the namespace.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
    Ok(())
}
