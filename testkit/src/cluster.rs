//! Real Kubernetes control planes for tests, envtest-style: etcd and kube-apiserver (and on
//! request kube-controller-manager and kube-scheduler) from the binary cache, on loopback,
//! with free ports and freshly generated certificates.
//!
//! Dropping a [`TestCluster`] stops every component (whole process groups) and removes its
//! directory; set `TETHER_KEEP_TEST_DIRS=1` to keep the directory (logs, certs) for
//! debugging.

use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_upstream::Component;

use crate::binaries::binary;
use crate::kubeconfig;
use crate::pki::{Ca, CertPair, LeafSpec};
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
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data = dir.join("etcd-data");
        let mut cmd = Command::new(binary(Component::Etcd)?);
        cmd.arg("--name=default")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            // Test data is thrown away: skip fsync so disk latency does not dominate tests.
            .arg("--unsafe-no-fsync");
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
    ca: Ca,
    admin: CertPair,
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

        let ca = Ca::new("tether-test-ca")?;
        let (ca_crt, _) = ca.pair().write(&pki, "ca")?;
        let (_, ca_key) = ca.pair().write(&pki, "ca")?;
        let serving = ca.issue(&LeafSpec::loopback_server(
            "kube-apiserver",
            &["kubernetes", "kubernetes.default", "kubernetes.default.svc"],
        ))?;
        let (tls_crt, tls_key) = serving.write(&pki, "apiserver")?;
        let (sa_key, sa_pub) = crate::pki::service_account_key()?;
        let sa_key_path = pki.join("sa.key");
        let sa_pub_path = pki.join("sa.pub");
        std::fs::write(&sa_key_path, sa_key).map_err(Error::io("write", &sa_key_path))?;
        std::fs::write(&sa_pub_path, sa_pub).map_err(Error::io("write", &sa_pub_path))?;
        let admin = ca.issue(&LeafSpec::client("tether-admin", &["system:masters"]))?;

        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        let mut cmd = Command::new(binary(Component::KubeApiserver)?);
        cmd.arg(format!("--etcd-servers={}", etcd.client_url()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--tls-cert-file={}", tls_crt.display()))
            .arg(format!("--tls-private-key-file={}", tls_key.display()))
            .arg(format!("--client-ca-file={}", ca_crt.display()))
            .arg(format!(
                "--service-account-key-file={}",
                sa_pub_path.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key_path.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-bootstrap-token-auth=true")
            .arg("--allow-privileged=true")
            .arg(format!("--cert-dir={}", pki.display()));
        let mut apiserver =
            Process::spawn("kube-apiserver", cmd, &root.join("kube-apiserver.log"))?;

        let admin_yaml = kubeconfig::render(&server, &ca.pair().cert_pem, "tether-admin", &admin);
        let admin_kubeconfig = root.join("admin.kubeconfig");
        kubeconfig::write(&admin_kubeconfig, &admin_yaml)?;
        let client = kubeconfig::client(&admin_kubeconfig).await?;
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
            let mut extra = vec![
                format!(
                    "--service-account-private-key-file={}",
                    sa_key_path.display()
                ),
                format!("--root-ca-file={}", ca_crt.display()),
                format!("--cluster-signing-cert-file={}", ca_crt.display()),
                format!("--cluster-signing-key-file={}", ca_key.display()),
                "--use-service-account-credentials=true".into(),
                "--controllers=*,bootstrapsigner,tokencleaner".into(),
            ];
            extra.push(format!("--service-cluster-ip-range={SERVICE_CIDR}"));
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
        let identity = self.ca.issue(&LeafSpec::client(user, &[]))?;
        let kc_path = root.join(format!("{name}.kubeconfig"));
        kubeconfig::write(
            &kc_path,
            &kubeconfig::render(&self.server, &self.ca.pair().cert_pem, user, &identity),
        )?;
        let (crt, key) = self
            .ca
            .issue(&LeafSpec::loopback_server(name, &[]))?
            .write(&pki, name)?;
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
        let probe = kubeconfig::client_from_yaml(&kubeconfig::render(
            &format!("https://127.0.0.1:{port}"),
            &self.ca.pair().cert_pem,
            "tether-admin",
            &self.admin,
        ))
        .await?;
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

    /// The cluster CA (to issue more identities).
    pub fn ca(&self) -> &Ca {
        &self.ca
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
