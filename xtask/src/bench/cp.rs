//! `cargo xtask bench cp`: hosted control planes on the process runtime.
//!
//! Runs `tether-operator standalone` in a temporary directory and measures:
//! - one TenantControlPlane created → its `/readyz` answers `ok`, and → phase Ready
//!   (Kamaji publishes 16 s for its equivalent; there is no Kamaji to run side by side on
//!   one machine without a management cluster, so the published figure is the reference);
//! - N tenants created at once → all Ready (wall time); RSS per tenant by component;
//!   operator RSS per tenant; reconcile duration p50/p99 (from the operator's metrics).
//!
//! N defaults to 20 and is read from `TETHER_BENCH_CP_TENANTS` (1..=40). Each tenant costs
//! roughly half a GiB, so 20 fit the 24 GiB machine; the whole run is bounded by a
//! 15-minute deadline and every process is stopped at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_upstream::Component;

use crate::error::Error;
use crate::steps::{fmt_duration, workspace_root};

const DEADLINE: Duration = Duration::from_secs(15 * 60);

fn step(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Step {
        step: what.to_string(),
        detail: e.to_string(),
    }
}

struct Operator {
    child: Child,
    dir: PathBuf,
    kubectl: PathBuf,
}

impl Operator {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg(format!(
            "--kubeconfig={}",
            self.dir.join("management.kubeconfig").display()
        ))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().map_err(step("kubectl"))?;
        if let Some(s) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(s.as_bytes())
                .map_err(step("kubectl stdin"))?;
        }
        let out = child.wait_with_output().map_err(step("kubectl"))?;
        if !out.status.success() {
            return Err(Error::Step {
                step: format!("kubectl {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn phases(&self) -> Result<Vec<(String, String)>, Error> {
        let out = self.kubectl(
            &[
                "get",
                "tcp",
                "-n",
                "bench",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.phase}{\"\\n\"}{end}",
            ],
            None,
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tenant(name: &str) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  kubernetes: {{version: v1.36.3}}\n---\n"
    )
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn pid_of(dir: &Path, tenant: &str, component: &str) -> Option<u32> {
    let s = std::fs::read_to_string(
        dir.join("tenants")
            .join(format!("bench.{tenant}"))
            .join("run")
            .join(format!("{component}.pid")),
    )
    .ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Whether the tenant's `/readyz` says `ok`, asked with `kubectl get --raw` through its
/// admin kubeconfig (which exists from the pipeline's second step on; before, not ready).
fn readyz(op: &Operator, name: &str) -> bool {
    let Ok(kc) = op.kubectl(
        &[
            "-n",
            "bench",
            "get",
            "secret",
            &format!("{name}-admin-kubeconfig"),
            "-o",
            "jsonpath={.data.admin\\.conf}",
        ],
        None,
    ) else {
        return false;
    };
    if kc.trim().is_empty() {
        return false;
    }
    let path = op.dir.join(format!("{name}.kubeconfig"));
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("piped")
                .write_all(kc.trim().as_bytes())?;
            c.wait_with_output()
        });
    let Ok(decoded) = decoded else { return false };
    if std::fs::write(&path, decoded.stdout).is_err() {
        return false;
    }
    Command::new(&op.kubectl)
        .arg(format!("--kubeconfig={}", path.display()))
        .args(["get", "--raw", "/readyz", "--request-timeout=1s"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "ok")
}

/// Runs the benchmark and prints Markdown rows.
pub fn run() -> Result<(), Error> {
    let n: usize = std::env::var("TETHER_BENCH_CP_TENANTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| (1..=40).contains(n))
        .unwrap_or(20);
    let root = workspace_root();
    let status = crate::steps::cargo()
        .args(["build", "-q", "-p", "tether-operator"])
        .current_dir(&root)
        .status()
        .map_err(step("cargo build -p tether-operator"))?;
    if !status.success() {
        return Err(Error::Step {
            step: "cargo build -p tether-operator".into(),
            detail: status.to_string(),
        });
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target.join("debug").join("tether-operator");
    let kubectl = tether_testkit::binaries::binary(Component::Kubectl)?;
    let dir = std::env::temp_dir().join(format!("tether-bench-cp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(step("create bench dir"))?;
    let log = std::fs::File::create(dir.join("operator.log")).map_err(step("create log"))?;
    let started = Instant::now();
    let child = Command::new(&binary)
        .args(["standalone", "--data-dir"])
        .arg(&dir)
        .env("RUST_LOG", "info,kube_client=off")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(step("dup log"))?)
        .stderr(log)
        .spawn()
        .map_err(step("start tether-operator standalone"))?;
    let op = Operator {
        child,
        dir: dir.clone(),
        kubectl,
    };
    while !dir.join("ready").exists() {
        if started.elapsed() > Duration::from_secs(120) {
            return Err(Error::Step {
                step: "standalone".into(),
                detail: "not ready in 120 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mgmt_ready = started.elapsed();
    op.kubectl(&["create", "namespace", "bench"], None)?;
    let op_rss_0 = rss_kib(op.child.id()).unwrap_or(0);

    println!("| case | figure | value | reference |");
    println!("|---|---|---|---|");
    println!(
        "| standalone start | management API + CRDs + default DataStore ready | {} | |",
        fmt_duration(mgmt_ready)
    );

    // One tenant: created -> /readyz ok, -> Ready.
    let t0 = Instant::now();
    op.kubectl(&["apply", "-f", "-"], Some(&tenant("solo")))?;
    let mut readyz_at = None;
    let ready_at;
    loop {
        if readyz_at.is_none() && readyz(&op, "solo") {
            readyz_at = Some(t0.elapsed());
        }
        if op
            .phases()?
            .iter()
            .any(|(n, p)| n == "solo" && p == "Ready")
        {
            ready_at = t0.elapsed();
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(Error::Step {
                step: "one tenant".into(),
                detail: "not Ready in 120 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let readyz_at = readyz_at.unwrap_or(ready_at);
    println!(
        "| 1 tenant | created → /readyz ok | {} | Kamaji: 16 s (published); goal ≤ 5 s |",
        fmt_duration(readyz_at)
    );
    println!(
        "| 1 tenant | created → phase Ready (bootstrapped) | {} | |",
        fmt_duration(ready_at)
    );

    // N tenants at once.
    let manifest: String = (0..n).map(|i| tenant(&format!("t{i:02}"))).collect();
    let t0 = Instant::now();
    op.kubectl(&["apply", "-f", "-"], Some(&manifest))?;
    loop {
        let ready = op
            .phases()?
            .iter()
            .filter(|(n, p)| n.starts_with('t') && p == "Ready")
            .count();
        if ready == n {
            break;
        }
        if t0.elapsed() > DEADLINE {
            return Err(Error::Step {
                step: format!("{n} tenants"),
                detail: format!("{ready} Ready after {}", fmt_duration(DEADLINE)),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let wall = t0.elapsed();
    println!(
        "| {n} tenants at once | created → all Ready | {} | |",
        fmt_duration(wall)
    );
    // Let start-up spikes settle before reading memory.
    std::thread::sleep(Duration::from_secs(10));
    let mut total = 0u64;
    for c in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "konnectivity-server",
    ] {
        let rss: Vec<u64> = (0..n)
            .filter_map(|i| pid_of(&dir, &format!("t{i:02}"), c).and_then(rss_kib))
            .collect();
        let avg = rss.iter().sum::<u64>() / rss.len().max(1) as u64;
        total += avg;
        println!(
            "| {n} tenants | RSS per tenant: {c} | {} MiB | |",
            avg / 1024
        );
    }
    println!(
        "| {n} tenants | RSS per tenant: all components | {} MiB | |",
        total / 1024
    );
    let op_rss = rss_kib(op.child.id()).unwrap_or(0);
    println!(
        "| {n} tenants | operator RSS per tenant | {} KiB (operator {} MiB → {} MiB) | |",
        op_rss.saturating_sub(op_rss_0) / (n as u64 + 1),
        op_rss_0 / 1024,
        op_rss / 1024
    );
    // Reconcile durations from the operator's metrics (written every 2 s).
    std::thread::sleep(Duration::from_secs(3));
    let metrics: serde_json::Value = std::fs::read(dir.join("metrics.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut all: Vec<f64> = metrics["reconciles_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    all.sort_by(|a, b| a.total_cmp(b));
    println!(
        "| all reconciles ({}) | duration p50 / p99 | {:.0} ms / {:.0} ms | |",
        all.len(),
        percentile(&all, 50.0),
        percentile(&all, 99.0)
    );
    if let Some(steps) = metrics["steps_ms"].as_object() {
        for (name, v) in steps {
            let mut v: Vec<f64> = v
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            v.sort_by(|a, b| a.total_cmp(b));
            println!(
                "| step {name} ({}) | p50 / p99 | {:.1} ms / {:.1} ms | |",
                v.len(),
                percentile(&v, 50.0),
                percentile(&v, 99.0)
            );
        }
    }
    drop(op);
    Ok(())
}
