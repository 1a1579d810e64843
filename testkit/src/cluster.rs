//! Real Kubernetes control planes for tests, envtest-style: etcd and kube-apiserver (and on
//! request kube-controller-manager and kube-scheduler) from the binary cache, on loopback,
//! with free ports and freshly generated certificates.
//!
//! Dropping a [`TestCluster`] stops every component (whole process groups) and removes its
//! directory; set `TETHER_KEEP_TEST_DIRS=1` to keep the directory (logs, certs) for
//! debugging.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_operator::controlplane::component::{ApiserverArgs, single_member_etcd};
use tether_operator::fs::write_atomic;
use tether_operator::kube::{client_from_kubeconfig, render_kubeconfig};
use tether_operator::x509::{self, LeafSpec};
use tether_upstream::Component;
use time::OffsetDateTime;

use crate::binaries::binary;
use crate::ports::free_port;
use crate::process::Process;
use crate::{Error, Result};

/// How long a component may take to become ready before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The service CIDR test clusters use.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// A single-member etcd on loopback (plain HTTP: only this machine can reach it).
pub struct Etcd {
    process: Process,
    client_url: String,
}

impl Etcd {
    /// Starts etcd with its data under `dir` and waits until `/health` says true.
    pub async fn start(dir: &Path) -> Result<Etcd> {
        let (client_port, peer_port) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client_port}");
        // Test data is thrown away: skip fsync so disk latency does not dominate tests.
        let spec = single_member_etcd(
            "default",
            &dir.join("etcd-data"),
            "http",
            (client_port, peer_port),
            vec!["--unsafe-no-fsync".into()],
        );
        let mut cmd = Command::new(binary(Component::Etcd)?);
        cmd.args(&spec.args);
        let mut process = Process::spawn("etcd", cmd, &dir.join("etcd.log"))?;
        let addr = format!("127.0.0.1:{client_port}");
        wait_ready("etcd", &mut process, || {
            let addr = addr.clone();
            async move {
                let body = http_get_plain(&addr, "/health").map_err(|e| e.to_string())?;
                Ok(body.contains("\"health\":\"true\""))
            }
        })
        .await?;
        Ok(Etcd {
            process,
            client_url,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// The etcd process (for log tails and kill tests).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Which components a [`TestCluster`] runs besides etcd and kube-apiserver.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterOptions {
    /// Run kube-controller-manager.
    pub controller_manager: bool,
    /// Run kube-scheduler.
    pub scheduler: bool,
}

impl ClusterOptions {
    /// All control-plane components.
    pub fn full() -> ClusterOptions {
        ClusterOptions {
            controller_manager: true,
            scheduler: true,
        }
    }
}

/// A running Kubernetes control plane. Fields drop in order: components before etcd, the
/// directory last.
pub struct TestCluster {
    scheduler: Option<Process>,
    controller_manager: Option<Process>,
    apiserver: Process,
    etcd: Etcd,
    server: String,
    admin_kubeconfig: PathBuf,
    client: kube::Client,
    /// The cluster CA: `(cert PEM, key PEM)`.
    ca: (String, String),
    /// The admin's client certificate: `(cert PEM, key PEM)`.
    admin: (String, String),
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// etcd + kube-apiserver.
    pub async fn start() -> Result<TestCluster> {
        TestCluster::start_with(ClusterOptions::default()).await
    }

    /// etcd + kube-apiserver + what `options` asks for; returns once every component is ready.
    pub async fn start_with(options: ClusterOptions) -> Result<TestCluster> {
        let dir = crate::test_dir("tether-cluster-")?;
        let root = dir.path().to_path_buf();
        let pki = root.join("pki");
        std::fs::create_dir_all(&pki).map_err(Error::io("create", &pki))?;

        let etcd = Etcd::start(&root).await?;
        let ca = write_pki(&pki)?;
        let admin = issue(&ca, &LeafSpec::client("tether-admin", &["system:masters"]))?;

        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        let mut cmd = Command::new(binary(Component::KubeApiserver)?);
        cmd.args(apiserver_args(&pki, etcd.client_url(), port));
        let mut apiserver =
            Process::spawn("kube-apiserver", cmd, &root.join("kube-apiserver.log"))?;

        let admin_yaml = kubeconfig(&server, &ca.0, "tether-admin", &admin);
        let admin_kubeconfig = root.join("admin.kubeconfig");
        write_atomic(&admin_kubeconfig, admin_yaml.as_bytes())?;
        let client = client_from_kubeconfig(&admin_yaml).await?;
        wait_ready("kube-apiserver", &mut apiserver, || {
            let client = client.clone();
            async move { readyz(&client, "/readyz").await }
        })
        .await?;

        let mut cluster = TestCluster {
            scheduler: None,
            controller_manager: None,
            apiserver,
            etcd,
            server,
            admin_kubeconfig,
            client,
            ca,
            admin,
            dir,
        };
        if options.controller_manager {
            let file = |f: &str| pki.join(f).display().to_string();
            let extra = vec![
                format!("--service-account-private-key-file={}", file("sa.key")),
                format!("--root-ca-file={}", file("ca.crt")),
                format!("--cluster-signing-cert-file={}", file("ca.crt")),
                format!("--cluster-signing-key-file={}", file("ca.key")),
                "--use-service-account-credentials=true".into(),
                "--controllers=*,bootstrapsigner,tokencleaner".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            ];
            let p = cluster
                .start_component(
                    Component::KubeControllerManager,
                    "system:kube-controller-manager",
                    &extra,
                )
                .await?;
            cluster.controller_manager = Some(p);
        }
        if options.scheduler {
            let p = cluster
                .start_component(Component::KubeScheduler, "system:kube-scheduler", &[])
                .await?;
            cluster.scheduler = Some(p);
        }
        Ok(cluster)
    }

    /// Starts kube-controller-manager or kube-scheduler with its own identity (the RBAC
    /// roles Kubernetes bootstraps for that user) and a serving certificate from our CA, and
    /// waits for its `/healthz`.
    async fn start_component(
        &self,
        component: Component,
        user: &str,
        extra: &[String],
    ) -> Result<Process> {
        let name = component.name();
        let root = self.dir.path();
        let pki = root.join("pki");
        let identity = self.issue(&LeafSpec::client(user, &[]))?;
        let kc_path = root.join(format!("{name}.kubeconfig"));
        let kc = kubeconfig(&self.server, &self.ca.0, user, &identity);
        write_atomic(&kc_path, kc.as_bytes())?;
        let (dns, ips) = loopback(&[]);
        let serving = self.issue(&LeafSpec::server(name, &dns, &ips))?;
        let (crt, key) = write_pair(&pki, name, &serving)?;
        let port = free_port();
        let mut cmd = Command::new(binary(component)?);
        cmd.arg(format!("--kubeconfig={}", kc_path.display()))
            .arg(format!("--authentication-kubeconfig={}", kc_path.display()))
            .arg(format!("--authorization-kubeconfig={}", kc_path.display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--tls-cert-file={}", crt.display()))
            .arg(format!("--tls-private-key-file={}", key.display()))
            .arg("--leader-elect=false")
            .args(extra);
        let mut process = Process::spawn(name, cmd, &root.join(format!("{name}.log")))?;
        let server = format!("https://127.0.0.1:{port}");
        let probe = kubeconfig(&server, &self.ca.0, "tether-admin", &self.admin);
        let probe = client_from_kubeconfig(&probe).await?;
        wait_ready(name, &mut process, || {
            let probe = probe.clone();
            async move { readyz(&probe, "/healthz").await }
        })
        .await?;
        Ok(process)
    }

    /// An admin client (`system:masters`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Path of the admin kubeconfig (for kubectl).
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The apiserver URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The cluster CA's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca.0
    }

    /// A certificate issued by the cluster CA (another identity): `(cert PEM, key PEM)`.
    pub fn issue(&self, spec: &LeafSpec<'_>) -> Result<(String, String)> {
        issue(&self.ca, spec)
    }

    /// The cluster's working directory (logs, certs, kubeconfigs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The body of the apiserver's `/readyz?verbose`.
    pub async fn readyz_verbose(&self) -> Result<String> {
        let req = http::Request::get("/readyz?verbose")
            .body(Vec::new())
            .expect("static request");
        self.client
            .request_text(req)
            .await
            .map_err(|e| Error::Kube(e.to_string()))
    }

    /// Runs the pinned kubectl against this cluster; returns stdout or an error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(binary(Component::Kubectl)?)
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(args)
            .output()
            .map_err(Error::io("run", "kubectl"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Command {
                command: format!("kubectl {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// Fails if any component has exited (with its log tail).
    pub fn check_running(&mut self) -> Result<()> {
        self.etcd.process().check_running()?;
        self.apiserver.check_running()?;
        for p in [&mut self.controller_manager, &mut self.scheduler]
            .into_iter()
            .flatten()
        {
            p.check_running()?;
        }
        Ok(())
    }
}

/// Writes the cluster CA, the API server's serving certificate and the service-account key
/// pair into `pki` under the names [`ApiserverArgs`] reads; returns the CA.
fn write_pki(pki: &Path) -> Result<(String, String)> {
    let ca = x509::new_ca("tether-test-ca", OffsetDateTime::now_utc())?;
    write_pair(pki, "ca", &ca)?;
    let (dns, ips) = loopback(&["kubernetes", "kubernetes.default", "kubernetes.default.svc"]);
    let serving = issue(&ca, &LeafSpec::server("kube-apiserver", &dns, &ips))?;
    write_pair(pki, "apiserver", &serving)?;
    let (sa_key, sa_pub) = x509::service_account_key()?;
    write_atomic(&pki.join("sa.key"), sa_key.as_bytes())?;
    write_atomic(&pki.join("sa.pub"), sa_pub.as_bytes())?;
    Ok(ca)
}

/// The test API server: the flags every Tether API server shares, plus bootstrap tokens
/// and privileged pods for the nodes tests join.
fn apiserver_args(pki: &Path, etcd: &str, port: u16) -> Vec<String> {
    let pki_dir = pki.display().to_string();
    let mut args = ApiserverArgs {
        etcd_servers: etcd,
        bind_address: "127.0.0.1",
        advertise_address: "127.0.0.1",
        secure_port: port,
        pki_dir: &pki_dir,
        client_ca: "ca.crt",
        service_account_issuer: "https://kubernetes.default.svc",
        service_cidr: SERVICE_CIDR,
        authorization_mode: "Node,RBAC",
    }
    .args();
    args.extend([
        "--enable-bootstrap-token-auth=true".to_string(),
        "--allow-privileged=true".into(),
        format!("--cert-dir={pki_dir}"),
    ]);
    args
}

/// A leaf issued by `ca`.
fn issue(ca: &(String, String), spec: &LeafSpec<'_>) -> Result<(String, String)> {
    let (cert, key) = ca;
    let now = OffsetDateTime::now_utc();
    Ok(x509::issue_with(
        cert.as_bytes(),
        key.as_bytes(),
        spec,
        now,
    )?)
}

/// Writes `dir/<name>.crt` and `dir/<name>.key`; returns both paths.
fn write_pair(
    dir: &Path,
    name: &str,
    (cert, key): &(String, String),
) -> Result<(PathBuf, PathBuf)> {
    let crt_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    write_atomic(&crt_path, cert.as_bytes())?;
    write_atomic(&key_path, key.as_bytes())?;
    Ok((crt_path, key_path))
}

/// Serving names for loopback: `localhost` and `extra`, and 127.0.0.1.
fn loopback(extra: &[&str]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec!["localhost".to_string()];
    dns.extend(extra.iter().map(|d| d.to_string()));
    (dns, vec![IpAddr::from([127, 0, 0, 1])])
}

/// A kubeconfig for `server` trusting `ca_pem`, as `user` with `client`.
fn kubeconfig(server: &str, ca_pem: &str, user: &str, (cert, key): &(String, String)) -> String {
    let (ca, cert, key) = (ca_pem.as_bytes(), cert.as_bytes(), key.as_bytes());
    render_kubeconfig("test", server, ca, user, cert, key)
}

/// `Ok(true)` once `path` answers 200 `ok`.
async fn readyz(client: &kube::Client, path: &str) -> Result<bool, String> {
    let req = http::Request::get(path)
        .body(Vec::new())
        .expect("static request");
    match client.request_text(req).await {
        Ok(body) => Ok(body.trim() == "ok"),
        Err(e) => Err(e.to_string()),
    }
}

/// Polls `probe` until it returns `Ok(true)`; fails with the log tail when the process
/// exits or [`READY_TIMEOUT`] passes.
async fn wait_ready<F, Fut>(name: &str, process: &mut Process, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, String>>,
{
    let start = Instant::now();
    let mut last;
    loop {
        process.check_running()?;
        match probe().await {
            Ok(true) => {
                tracing::debug!(component = name, elapsed = ?start.elapsed(), "ready");
                return Ok(());
            }
            Ok(false) => last = "answered, not ready".into(),
            Err(e) => last = e,
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(Error::NotReady {
                component: name.to_string(),
                seconds: READY_TIMEOUT.as_secs(),
                reason: last,
                log_tail: process.log_tail(40),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.0 GET on loopback returning the body (etcd's health endpoint; no TLS).
fn http_get_plain(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
