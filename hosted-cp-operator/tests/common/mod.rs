//! Shared helpers of the acceptance tests: a `tether-operator standalone` child process,
//! kubectl, etcdctl and waiting on TenantControlPlane status.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use tether_api::{TenantControlPlane, TenantControlPlanePhase};
use tether_upstream::Component;

/// A running `tether-operator standalone`; SIGTERM + wait on drop (which stops tenants).
pub struct Standalone {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub client: kube::Client,
    /// The temp dir (kept across operator restarts by taking it).
    pub tmp: Option<tempfile::TempDir>,
}

impl Standalone {
    /// Starts the operator on a fresh temp dir.
    pub async fn start() -> Standalone {
        Standalone::start_with(&[]).await
    }

    /// Starts the operator on a fresh temp dir with extra `standalone` arguments.
    pub async fn start_with(args: &[&str]) -> Standalone {
        let tmp = tether_testkit::test_dir("tether-standalone-").unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Standalone::start_in_with(&dir, args).await;
        s.tmp = Some(tmp);
        s
    }

    /// Starts (or restarts) the operator on `dir`.
    pub async fn start_in(dir: &Path) -> Standalone {
        Standalone::start_in_with(dir, &[]).await
    }

    async fn start_in_with(dir: &Path, args: &[&str]) -> Standalone {
        let _ = std::fs::remove_file(dir.join("ready"));
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("operator.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tether-operator"))
            .args(["standalone", "--data-dir"])
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "info,kube_client=off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !dir.join("ready").exists() {
            assert!(
                Instant::now() < deadline,
                "standalone not ready:\n{}",
                tail(&dir.join("operator.log"))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kc = std::fs::read_to_string(dir.join("management.kubeconfig")).unwrap();
        let client = tether_operator::kube::client_from_kubeconfig(&kc)
            .await
            .unwrap();
        Standalone {
            child: Some(child),
            dir: dir.to_path_buf(),
            client,
            tmp: None,
        }
    }

    /// kubectl against the management cluster.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        kubectl(&self.dir.join("management.kubeconfig"), args)
    }

    /// Stops the operator like systemd would (SIGTERM, wait).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the operator with SIGKILL: its children stay behind, as after a crash.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates a TenantControlPlane from YAML.
    pub async fn create(&self, yaml: &str) -> TenantControlPlane {
        let tcp: TenantControlPlane = serde_yaml::from_str(yaml).unwrap();
        let ns = tcp
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        Api::<TenantControlPlane>::namespaced(self.client.clone(), &ns)
            .create(&PostParams::default(), &tcp)
            .await
            .unwrap()
    }

    /// Waits until `pred` holds for tenant `ns/name`, returning it.
    pub async fn wait_for(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&TenantControlPlane) -> bool,
    ) -> TenantControlPlane {
        let api = Api::<TenantControlPlane>::namespaced(self.client.clone(), ns);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(t)) = api.get_opt(name).await
                && pred(&t)
            {
                return t;
            }
            if Instant::now() > deadline {
                let last = api
                    .get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|t| t.status);
                panic!(
                    "{ns}/{name}: not {what} after {timeout:?}; status {last:#?}\n{}",
                    tail(&self.dir.join("operator.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for phase Ready.
    pub async fn wait_ready(&self, ns: &str, name: &str, timeout: Duration) -> TenantControlPlane {
        self.wait_for(ns, name, timeout, "Ready", |t| {
            t.status.as_ref().is_some_and(|s| {
                s.phase == TenantControlPlanePhase::Ready
                    && s.observed_generation == t.metadata.generation
            })
        })
        .await
    }

    /// The tenant's admin kubeconfig written to a file.
    pub fn admin_kubeconfig(&self, name: &str) -> PathBuf {
        let out = self
            .kubectl(&[
                "get",
                "secret",
                &format!("{name}-admin-kubeconfig"),
                "-o",
                "jsonpath={.data.admin\\.conf}",
            ])
            .unwrap();
        use base64::Engine;
        let kc = base64::engine::general_purpose::STANDARD
            .decode(out.trim())
            .unwrap();
        let path = self.dir.join(format!("{name}.admin.kubeconfig"));
        std::fs::write(&path, kc).unwrap();
        path
    }

    /// A Secret key's decoded value.
    pub fn secret(&self, ns: &str, name: &str, key: &str) -> Vec<u8> {
        let out = self
            .kubectl(&[
                "-n",
                ns,
                "get",
                "secret",
                name,
                "-o",
                &format!("jsonpath={{.data.{}}}", key.replace('.', "\\.")),
            ])
            .unwrap();
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(out.trim())
            .unwrap()
    }

    /// Pid of a tenant component from its pidfile.
    pub fn pid(&self, tenant: &str, component: &str) -> Option<u32> {
        let s = std::fs::read_to_string(
            self.dir
                .join("tenants")
                .join(tenant)
                .join("run")
                .join(format!("{component}.pid")),
        )
        .ok()?;
        s.split_whitespace().next()?.parse().ok()
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop();
    }
}

/// kubectl from the binary cache.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tether_testkit::binaries::binary(Component::Kubectl).unwrap())
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// etcdctl from the binary cache with the given client credentials (a dir with the files).
pub fn etcdctl(
    endpoint: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    args: &[&str],
) -> Result<String, String> {
    let out = Command::new(tether_testkit::binaries::binary(Component::Etcdctl).unwrap())
        .arg(format!("--endpoints={endpoint}"))
        .arg(format!("--cacert={}", ca.display()))
        .arg(format!("--cert={}", cert.display()))
        .arg(format!("--key={}", key.display()))
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let rest = &s[s.rfind(')').unwrap() + 2..];
        !rest.starts_with('Z')
    })
}

/// The last 60 lines of a file.
pub fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
