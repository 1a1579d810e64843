//! `cargo xtask bench store`: the artifact store serving a node artifact, fetched by the
//! agent's downloader (release `tether-agent fetch`: streaming sha256, `.part` file, fsync,
//! rename) and by `curl -o` (no check) side by side, same blob, same run, each as a process.
//!
//! Runs the pinned CNCF `registry` on loopback in a temporary directory with the
//! operator's configuration (`tether_operator::artifacts::config`), pushes the node artifacts
//! (`tether_image::node_artifacts`, timed), then fetches the kubelet's blob ROUNDS times
//! with each client, alternating, into fresh files. Prints MB/s (median) and the ratio.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_image::node_artifacts;
use tether_testkit::process::Process;
use tether_upstream::{Cache, Component, Pins};

use crate::error::Error;

const ROUNDS: usize = 7;

fn fail(step: &str, detail: impl std::fmt::Display) -> Error {
    Error::Step {
        step: step.into(),
        detail: detail.to_string(),
    }
}

/// Runs the benchmark.
pub fn run() -> Result<(), Error> {
    let dir = tempfile::tempdir().map_err(|e| fail("tempdir", e))?;
    let addr: SocketAddr = format!("127.0.0.1:{}", tether_testkit::ports::free_port())
        .parse()
        .expect("loopback address");
    let bin = super::enroll::release_binaries(&crate::steps::workspace_root())?;
    let registry = start_registry(dir.path(), addr)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| fail("tokio", e))?;
    rt.block_on(tether_operator::artifacts::wait_ready(
        addr,
        Duration::from_secs(30),
    ))
    .map_err(|e| fail("registry", e))?;

    let store = addr.to_string();
    let t = Instant::now();
    let pushed = node_artifacts::push_all(&store, &Pins::default(), &dir.path().join("work"))
        .map_err(|e| fail("push node artifacts", e))?;
    let push_time = t.elapsed();
    let total: u64 = pushed.iter().map(|a| a.size).sum();
    let kubelet = pushed
        .iter()
        .find(|a| a.component == Component::Kubelet)
        .expect("kubelet is a node artifact");
    let url = format!("http://{store}{}", kubelet.blob_path());
    let sha = kubelet.blob.trim_start_matches("sha256:").to_string();

    let (mut ours, mut theirs, mut checked) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let dest = dir.path().join(format!("ours-{round}"));
        let t = Instant::now();
        let out = Command::new(bin.join("tether-agent"))
            .args(["fetch", "--url", &url, "--sha256", &sha, "--size"])
            .arg(kubelet.size.to_string())
            .arg(&dest)
            .output()
            .map_err(|e| fail("tether-agent fetch", e))?;
        ours.push(t.elapsed());
        if !out.status.success() {
            return Err(fail(
                "tether-agent fetch",
                String::from_utf8_lossy(&out.stderr),
            ));
        }
        let _ = std::fs::remove_file(&dest);

        let dest = dir.path().join(format!("curl-{round}"));
        let t = Instant::now();
        let ok = Command::new("curl")
            .args(["-s", "-f", "-o"])
            .arg(&dest)
            .arg(&url)
            .status()
            .map_err(|e| fail("curl (install curl; cargo xtask deps does)", e))?
            .success();
        theirs.push(t.elapsed());
        if !ok || std::fs::metadata(&dest).map(|m| m.len()).ok() != Some(kubelet.size) {
            return Err(fail("curl", format!("GET {url} failed")));
        }
        let _ = std::fs::remove_file(&dest);

        // The same work as ours with the usual tools: fetch, hash, sync.
        let t = Instant::now();
        let script = format!(
            "curl -s -f -o {0} {url} && echo '{sha}  {0}' | sha256sum -c --status && sync {0}",
            dest.display()
        );
        let ok = Command::new("sh")
            .args(["-c", &script])
            .status()
            .map_err(|e| fail("curl + sha256sum + sync", e))?
            .success();
        checked.push(t.elapsed());
        if !ok {
            return Err(fail("curl + sha256sum + sync", "failed"));
        }
        let _ = std::fs::remove_file(&dest);
    }
    drop(registry);

    let mbps = |d: Duration| kubelet.size as f64 / 1e6 / d.as_secs_f64();
    let (o, c, k) = (median(&mut ours), median(&mut theirs), median(&mut checked));
    println!("| case | figure | value |");
    println!("|---|---|---|");
    println!(
        "| push | {} node artifacts ({:.1} MB) into an empty store, `crane push` of OCI layouts | {:.1} s |",
        pushed.len(),
        total as f64 / 1e6,
        push_time.as_secs_f64()
    );
    println!(
        "| fetch | kubelet blob ({:.1} MB), release `tether-agent fetch` (sha256 + fsync + rename), median of {ROUNDS} | {:.0} MB/s |",
        kubelet.size as f64 / 1e6,
        mbps(o)
    );
    println!(
        "| fetch | the same blob, `curl -o` (no check), median of {ROUNDS} | {:.0} MB/s |",
        mbps(c)
    );
    println!(
        "| fetch | the same blob, `curl -o` + `sha256sum -c` + `sync` (the same work as ours), median of {ROUNDS} | {:.0} MB/s |",
        mbps(k)
    );
    println!(
        "| fetch | agent downloader / curl throughput; / curl + sha256sum + sync | {:.2}×; {:.2}× |",
        mbps(o) / mbps(c),
        mbps(o) / mbps(k)
    );
    Ok(())
}

fn start_registry(dir: &Path, addr: SocketAddr) -> Result<Process, Error> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| fail("registry data", e))?;
    let config = dir.join("config.yml");
    std::fs::write(&config, tether_operator::artifacts::config(&data, addr))
        .map_err(|e| fail("registry config", e))?;
    let binary = Cache::from_env()
        .pinned(Component::Registry)
        .map_err(|e| fail("registry binary (run `cargo xtask deps`)", e))?;
    let mut cmd = Command::new(binary);
    cmd.arg("serve").arg(&config).stdin(Stdio::null());
    Process::spawn("registry", cmd, &dir.join("registry.log")).map_err(|e| fail("registry", e))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}
