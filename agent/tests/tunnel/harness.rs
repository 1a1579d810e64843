//! The parts the tunnel tests are made of: a CA, konnectivity-server processes, the agent
//! under test with its watches, a frontend that dials like the kube-apiserver, and TCP
//! servers on loopback.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tempfile::TempDir;
use tether_agent::tunnel::proto::Packet;
use tether_agent::tunnel::proto::packet::Payload;
use tether_agent::tunnel::proto::proxy_service_client::ProxyServiceClient;
use tether_agent::tunnel::{self, Allow, Settings, Status};
use tether_api::tenant_control_plane::Cidr;
use tether_upstream::{Cache, Component};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::{Endpoint, Uri};

/// Every wait in these tests ends by then.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("tether_agent=debug")
        .with_test_writer()
        .try_init();
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after [`DEADLINE`].
pub async fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CA and a server certificate for 127.0.0.1, as files for the server.
pub struct Pki {
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tenant-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "konnectivity-server");
    leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let pki = Pki {
        ca_pem,
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

/// One konnectivity-server process, killed on drop.
pub struct Server {
    pub id: String,
    pub child: Child,
    pub uds: PathBuf,
    pub log: PathBuf,
}

impl Server {
    pub async fn start(dir: &Path, pki: &Pki, id: &str, count: usize, agent_port: u16) -> Server {
        let binary = Cache::from_env()
            .pinned(Component::KonnectivityServer)
            .expect("konnectivity-server is not cached: run `cargo xtask deps`");
        let uds = dir.join(format!("{id}.sock"));
        let log = dir.join(format!("{id}.log"));
        let port = |p: u16| p.to_string();
        let child = Command::new(binary)
            .args([
                "--mode=grpc",
                "--delete-existing-uds-file",
                "--server-port=0",
            ])
            .arg(format!("--uds-name={}", uds.display()))
            .args([
                "--agent-bind-address=127.0.0.1",
                "--agent-port",
                &port(agent_port),
            ])
            .args([
                "--admin-bind-address=127.0.0.1",
                "--admin-port",
                &port(free_port()),
            ])
            .args([
                "--health-bind-address=127.0.0.1",
                "--health-port",
                &port(free_port()),
            ])
            .arg(format!("--cluster-cert={}", pki.cert.display()))
            .arg(format!("--cluster-key={}", pki.key.display()))
            .arg("--proxy-strategies=destHost,default")
            .arg(format!("--server-count={count}"))
            .arg(format!("--server-id={id}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Server {
            id: id.to_string(),
            child,
            uds,
            log,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("server {id} exited ({status}):\n{}", server.logs());
            }
            let agent_up = TcpStream::connect(("127.0.0.1", agent_port)).await.is_ok();
            if agent_up && UnixStream::connect(&server.uds).await.is_ok() {
                return server;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "server {id} did not start:\n{}",
                server.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times the server logged `needle`.
    pub fn logged(&self, needle: &str) -> usize {
        self.logs().matches(needle).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent under test: `tunnel::run` with its three watches.
pub struct Agent {
    pub settings: watch::Sender<Option<Settings>>,
    pub status: watch::Receiver<Status>,
    pub drain: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

impl Agent {
    pub fn start(settings: Settings) -> Agent {
        let (settings_tx, settings_rx) = watch::channel(Some(settings));
        let (status_tx, status) = watch::channel(Status::default());
        let (drain, drain_rx) = watch::channel(false);
        let task = tokio::spawn(tunnel::run(settings_rx, status_tx, drain_rx));
        Agent {
            settings: settings_tx,
            status,
            drain,
            task,
        }
    }

    pub async fn wait(&mut self, what: &str, mut ok: impl FnMut(&Status) -> bool) -> Status {
        let got = tokio::time::timeout(DEADLINE, self.status.wait_for(|s| ok(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match got {
            Ok(Ok(s)) => s,
            _ => panic!(
                "timed out waiting for {what}; status {:?}",
                *self.status.borrow()
            ),
        }
    }

    pub async fn wait_servers(&mut self, ids: &[&str]) -> Status {
        let want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.wait(&format!("servers {ids:?}"), |s| {
            s.servers.iter().cloned().collect::<Vec<_>>() == want
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn settings(server: &str, pki: &Pki) -> Settings {
    Settings {
        server: server.to_string(),
        ca_pem: pki.ca_pem.clone(),
        // The server runs without token auth; the header is still sent.
        token: "test-token".into(),
        agent_id: "node-a".into(),
        node_name: "node-a".into(),
        node_ip: Some("10.255.0.5".parse().unwrap()),
        allow: Allow {
            node_ips: vec!["10.255.0.5".parse().unwrap()],
            node_names: vec!["node-a".into()],
            kubelet_port: 10250,
            // Loopback stands in for the tenant's pod network.
            cidrs: vec![Cidr::parse("127.0.0.0/8").unwrap()],
        },
    }
}

/// One proxied connection, as the kube-apiserver's konnectivity client holds it.
pub struct Tunnel {
    pub tx: mpsc::Sender<Packet>,
    pub rx: Streaming<Packet>,
    pub id: i64,
}

pub static RANDOM: AtomicI64 = AtomicI64::new(1_000);

/// A `ProxyService.Proxy` stream over the server's Unix socket, opened with `first` (the
/// server sends response headers only with its first packet, so the call returns after it).
pub async fn proxy_stream(uds: &Path, first: Packet) -> (mpsc::Sender<Packet>, Streaming<Packet>) {
    let path = uds.to_path_buf();
    let open = async move {
        let channel =
            Endpoint::from_static("http://konnectivity.invalid")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .unwrap();
        let (tx, mut rx) = mpsc::channel::<Packet>(64);
        tx.send(first).await.unwrap();
        let outbound = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let inbound = ProxyServiceClient::new(channel)
            .proxy(outbound)
            .await
            .unwrap()
            .into_inner();
        (tx, inbound)
    };
    tokio::time::timeout(DEADLINE, open)
        .await
        .expect("timed out opening a frontend stream")
}

pub async fn next(rx: &mut Streaming<Packet>) -> Option<Packet> {
    tokio::time::timeout(DEADLINE, rx.message())
        .await
        .expect("timed out waiting for a packet")
        .expect("frontend stream failed")
}

/// DIAL_REQ through `uds`; `Err` is DIAL_RSP's error.
pub async fn dial(uds: &Path, address: &str) -> Result<Tunnel, String> {
    let random = RANDOM.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = proxy_stream(uds, Packet::dial_request("tcp", address, random)).await;
    let packet = next(&mut rx).await.expect("stream ended before DIAL_RSP");
    match packet.payload {
        Some(Payload::DialResponse(r)) => {
            assert_eq!(r.random, random);
            if r.error.is_empty() {
                assert!(r.connect_id > 0, "{r:?}");
                Ok(Tunnel {
                    tx,
                    rx,
                    id: r.connect_id,
                })
            } else {
                Err(r.error)
            }
        }
        other => panic!("expected DIAL_RSP, got {other:?}"),
    }
}

/// [`dial`], retried while the answer is the server's (no agent registered yet, which can
/// trail the agent's handshake by a moment) rather than the agent's.
pub async fn dial_through(uds: &Path, address: &str) -> Result<Tunnel, String> {
    let start = Instant::now();
    loop {
        match dial(uds, address).await {
            Err(e) if !e.starts_with("tether-agent") && start.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            result => return result,
        }
    }
}

impl Tunnel {
    pub async fn send(&self, data: &[u8]) {
        self.tx
            .send(Packet::data(self.id, Bytes::copy_from_slice(data)))
            .await
            .unwrap();
    }

    /// Reads DATA until `n` bytes have arrived.
    pub async fn read(&mut self, n: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let packet = next(&mut self.rx).await.expect("stream ended");
            match packet.payload {
                Some(Payload::Data(d)) => {
                    assert_eq!(d.connect_id, self.id);
                    got.extend_from_slice(&d.data);
                }
                other => panic!("expected DATA, got {other:?}"),
            }
        }
        assert_eq!(got.len(), n, "more bytes than sent");
        got
    }
}

/// An echo server on loopback; counts connections that ended.
pub async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ended = Arc::new(AtomicUsize::new(0));
    let count = ended.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, ended)
}

/// Deterministic bytes that no echo of a shorter pattern could fake.
pub fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A load balancer stand-in: connection `i` goes to backend `i % n`.
pub async fn round_robin(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut i = 0;
        while let Ok((mut front, _)) = listener.accept().await {
            let backend = backends[i % backends.len()];
            i += 1;
            tokio::spawn(async move {
                if let Ok(mut back) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
                }
            });
        }
    });
    addr
}

pub fn pki_in(dir: &TempDir, name: &str) -> Pki {
    let sub = dir.path().join(name);
    std::fs::create_dir_all(&sub).unwrap();
    pki(&sub)
}
