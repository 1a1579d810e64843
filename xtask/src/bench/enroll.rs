//! `cargo xtask bench enroll`: the machine API under an enrollment storm, and the agent's
//! memory.
//!
//! Runs a release `tether-operator standalone` in a temporary directory with the enrollment
//! rate limit raised (printed), then:
//! - N simulated agents (the real agent library's enrollment: key, CSR, pinned TLS, one POST;
//!   each with its own MAC) enroll at once, each with its own single-use token (as PXE boot
//!   tokens are): enrollments/s, p50/p99 latency, operator RSS per machine;
//! - the same with one pool token shared by all N (compare-and-swap contention on one Secret);
//! - a release `tether-agent run`, enrolled, long-polling and reporting for 30 s: steady and
//!   peak RSS (goal ≤ 15 MB).
//!
//! N defaults to 200 (`TETHER_BENCH_ENROLL_AGENTS`, 1..=500). No anchor publishes an
//! enrollment figure to set beside these (kubeadm's TLS bootstrap is one kubelet at a time).
//! Everything runs on loopback; the run is bounded by a 10-minute deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_agent::identity::StateDir;
use tether_boot::seed::Seed;
use tether_boot::{CaPin, Token};

use crate::error::Error;
use crate::steps::{fmt_duration, workspace_root};

const DEADLINE: Duration = Duration::from_secs(600);

fn step(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Step {
        step: what.to_string(),
        detail: e.to_string(),
    }
}

fn fail(step: &str, detail: impl Into<String>) -> Error {
    Error::Step {
        step: step.into(),
        detail: detail.into(),
    }
}

/// A child killed (SIGTERM, then SIGKILL) on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// VmRSS and VmHWM of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

/// Builds the release operator and agent; returns their directory.
pub(super) fn release_binaries(root: &Path) -> Result<PathBuf, Error> {
    println!(
        "==> cargo build --release -p tether-operator -p tether-agent (a few minutes the first time)"
    );
    let status = crate::steps::cargo()
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "tether-operator",
            "-p",
            "tether-agent",
        ])
        .current_dir(root)
        .status()
        .map_err(step("cargo build --release"))?;
    if !status.success() {
        return Err(fail("cargo build --release", status.to_string()));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release"))
}

/// `tether-operator token create …` against `kubeconfig`: the token.
fn token(bin: &Path, kubeconfig: &Path, args: &[&str]) -> Result<Token, Error> {
    let out = Command::new(bin.join("tether-operator"))
        .args(["token", "create"])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .map_err(step("token create"))?;
    if !out.status.success() {
        return Err(fail("token create", String::from_utf8_lossy(&out.stderr)));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e: tether_boot::Error| fail("token create", e.to_string()))
}

/// N agents enroll at once, agent `i` with `tokens[i % tokens.len()]`; each latency.
fn storm(
    dir: &Path,
    api: &str,
    pin: CaPin,
    tokens: &[Token],
    n: usize,
    tag: &str,
) -> Result<(Duration, Vec<Duration>), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(step("tokio runtime"))?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let root = dir.join(format!("{tag}-{i}"));
        std::fs::create_dir_all(root.join("proc")).map_err(step("node tree"))?;
        std::fs::write(
            root.join("proc/cmdline"),
            format!(
                "tether.mac=52:54:{:02x}:00:{:02x}:{:02x}\n",
                tag.len(),
                i / 256,
                i % 256
            ),
        )
        .map_err(step("node tree"))?;
        let seed = Seed::new(api, pin, tokens[i % tokens.len()].clone())
            .map_err(|e| fail("seed", e.to_string()))?;
        nodes.push((root, seed));
    }
    rt.block_on(async move {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (root, seed) in nodes {
            tasks.spawn(async move {
                let t = Instant::now();
                let state = StateDir::new(root.join("state"));
                tether_agent::enroll::enroll(&root, &state, Some(seed), &Default::default())
                    .await
                    .map(|_| t.elapsed())
                    .map_err(|e| e.to_string())
            });
        }
        let mut lat = Vec::new();
        let mut errors = Vec::new();
        while let Some(r) = tokio::time::timeout(DEADLINE, tasks.join_next())
            .await
            .map_err(|_| fail("enrollment storm", "did not finish in time"))?
        {
            match r {
                Ok(Ok(d)) => lat.push(d),
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let wall = started.elapsed();
        if !errors.is_empty() {
            return Err(fail(
                "enrollment storm",
                format!("{} of {n} failed, first: {}", errors.len(), errors[0]),
            ));
        }
        lat.sort();
        Ok((wall, lat))
    })
}

/// Runs the benchmark and prints Markdown rows.
pub fn run() -> Result<(), Error> {
    let n: usize = std::env::var("TETHER_BENCH_ENROLL_AGENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| (1..=500).contains(n))
        .unwrap_or(200);
    let root = workspace_root();
    let bin = release_binaries(&root)?;
    let dir = std::env::temp_dir().join(format!("tether-bench-enroll-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(step("create bench dir"))?;
    let rate = (4 * n) as u32;
    println!(
        "==> tether-operator standalone (release), enrollment rate limit raised to {rate}/s, burst {rate}"
    );
    let log = std::fs::File::create(dir.join("operator.log")).map_err(step("create log"))?;
    let data = dir.join("standalone");
    let op = Guard(
        Command::new(bin.join("tether-operator"))
            .args(["standalone", "--data-dir"])
            .arg(&data)
            .args([
                "--enroll-rate",
                &rate.to_string(),
                "--enroll-burst",
                &rate.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(step("dup log"))?)
            .stderr(log)
            .spawn()
            .map_err(step("start tether-operator standalone"))?,
    );
    let t0 = Instant::now();
    while !data.join("ready").exists() {
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(fail("standalone", "not ready in 120 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let kubeconfig = data.join("management.kubeconfig");
    let (api, pin) = tether_testkit::published::machine_api(&kubeconfig, Duration::from_secs(60))?;
    println!("==> minting {n} single-use tokens and one pool token for {n}");
    let own: Vec<Token> = (0..n)
        .map(|_| token(&bin, &kubeconfig, &["--ttl", "1h", "--uses", "1"]))
        .collect::<Result<_, _>>()?;
    let pool = token(
        &bin,
        &kubeconfig,
        &["--ttl", "1h", "--uses", &n.to_string()],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let (rss0, _) = rss_kib(op.0.id());

    println!("==> {n} agents enroll at once, one token each");
    let (wall, lat) = storm(&dir, &api, pin, &own, n, "own")?;
    std::thread::sleep(Duration::from_secs(3));
    let (rss1, _) = rss_kib(op.0.id());
    println!("==> {n} agents enroll at once with one pool token");
    let (wall_pool, lat_pool) = storm(&dir, &api, pin, std::slice::from_ref(&pool), n, "pool")?;

    // A real agent process: enrolled, then the service for 30 s.
    println!("==> tether-agent run (release): enrolled, long-polling and reporting for 30 s");
    let agent_state = dir.join("agent-state");
    let solo = token(&bin, &kubeconfig, &["--ttl", "1h", "--uses", "1"])?;
    let out = Command::new(bin.join("tether-agent"))
        .args([
            "enroll",
            "--api",
            &api,
            "--ca-pin",
            &pin.to_string(),
            "--token",
            &solo.to_string(),
        ])
        .arg("--state-dir")
        .arg(&agent_state)
        .output()
        .map_err(step("tether-agent enroll"))?;
    if !out.status.success() {
        return Err(fail(
            "tether-agent enroll",
            String::from_utf8_lossy(&out.stderr),
        ));
    }
    let agent = Guard(
        Command::new(bin.join("tether-agent"))
            .args(["run", "--state-dir"])
            .arg(&agent_state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(step("tether-agent run"))?,
    );
    let mut steady = Vec::new();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        steady.push(rss_kib(agent.0.id()).0);
    }
    let (_, peak) = rss_kib(agent.0.id());
    drop(agent);
    drop(op);
    let _ = std::fs::remove_dir_all(&dir);

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let steady_kib = steady[steady.len() / 2..]
        .iter()
        .copied()
        .max()
        .unwrap_or(0);
    println!("| case | figure | value | reference |");
    println!("|---|---|---|---|");
    println!(
        "| {n} agents, own tokens | all enrolled | {} ({:.0} enrollments/s) | |",
        fmt_duration(wall),
        n as f64 / wall.as_secs_f64()
    );
    println!(
        "| {n} agents, own tokens | latency p50 / p99 | {} / {} | |",
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 99.0))
    );
    println!(
        "| {n} agents, own tokens | operator RSS per enrolled machine | {:.1} KiB ({} → {} MiB) | |",
        (rss1.saturating_sub(rss0)) as f64 / n as f64,
        rss0 / 1024,
        rss1 / 1024
    );
    println!(
        "| {n} agents, one pool token | all enrolled | {} ({:.0} enrollments/s) | |",
        fmt_duration(wall_pool),
        n as f64 / wall_pool.as_secs_f64()
    );
    println!(
        "| {n} agents, one pool token | latency p50 / p99 | {} / {} | |",
        ms(percentile(&lat_pool, 50.0)),
        ms(percentile(&lat_pool, 99.0))
    );
    println!(
        "| tether-agent run (release) | RSS steady / peak | {:.1} MB / {:.1} MB | goal ≤ 15 MB |",
        steady_kib as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    Ok(())
}
