//! `cargo xtask bench join`: how long a machine takes to become a Ready Node of its
//! tenant through a WorkerPool, measured by the site test that proves it
//! (`tests/vm/tests/site/workers.rs`, `a_worker_pool_joins_an_nspawn_and_a_pxe_booted_machine`):
//! a qemu (TCG) machine from power-on through PXE, kernel, systemd, enrollment, download,
//! kubelet start, TLS bootstrap and CNI to Node Ready; an nspawn machine from enrollment to
//! Ready; the bytes the qemu node fetched from the store; the nspawn agent's memory. The
//! test prints them as one `bench: {json}` line; this prints them as table rows.
//!
//! No anchor runs here: Karpenter + Bottlerocket register and initialise a node in about
//! 30 s on EC2, natively (akingscote.co.uk/posts/aws-eks-bottlerocket-prefetch); the goal
//! under TCG is 60 s.

use std::process::Stdio;

use serde_json::Value;

use crate::error::Error;
use crate::steps::workspace_root;

const TEST: &str = "workers::a_worker_pool_joins_an_nspawn_and_a_pxe_booted_machine";
const GOAL_S: f64 = 60.0;
const ANCHOR_S: f64 = 30.0;

fn fail(what: impl std::fmt::Display) -> Error {
    Error::Usage(format!("bench join: {what}"))
}

/// Runs the join test once and prints its figures.
pub fn run() -> Result<(), Error> {
    eprintln!("bench join: running {TEST} (site, image, tenant, two machines: ~6 min)");
    let out = crate::steps::cargo()
        .current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "tether-vm-tests",
            "--test",
            "site",
            "--",
            "--exact",
            TEST,
        ])
        .args(["--nocapture"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .map_err(fail)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        return Err(fail(format!(
            "the test failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("bench: "))
        .ok_or_else(|| fail("the test printed no `bench:` line"))?;
    let b: Value = serde_json::from_str(line).map_err(fail)?;
    print(&b);
    Ok(())
}

fn print(b: &Value) {
    let cmd = "cargo xtask bench join";
    println!("| figure | value | command |");
    println!("|---|---|---|");
    let mut prev = 0.0;
    let mut ready = None;
    for p in b["qemu_phases"].as_array().into_iter().flatten() {
        let (what, at) = (p[0].as_str().unwrap_or(""), p[1].as_f64().unwrap_or(0.0));
        println!(
            "| qemu (TCG) power-on → {what} | {at:.1} s (+{:.1} s) | `{cmd}` |",
            at - prev
        );
        prev = at;
        if what == "Node Ready" {
            ready = Some(at);
        }
    }
    if let Some(r) = ready {
        println!(
            "| qemu power-on → Node Ready vs goal {GOAL_S:.0} s / Karpenter + Bottlerocket on EC2 ({ANCHOR_S:.0} s, native) | {:.2}× / {:.2}× | `{cmd}` |",
            r / GOAL_S,
            r / ANCHOR_S
        );
    }
    let f = |k: &str| b[k].as_f64().unwrap_or(0.0);
    println!(
        "| nspawn: enrolled → Node Ready / boot → Node Ready | {:.1} s / {:.1} s | `{cmd}` |",
        f("nspawn_enrolled_to_ready_s"),
        f("nspawn_boot_to_ready_s")
    );
    println!(
        "| qemu node: bytes fetched from the store, node binaries / everything | {:.1} MB / {:.1} MB | `{cmd}` |",
        f("qemu_bytes_binaries") / 1e6,
        f("qemu_bytes_all") / 1e6
    );
    println!(
        "| nspawn `tether-agent run` RSS joined (steady) / peak | {:.1} MB / {:.1} MB | `{cmd}` |",
        f("agent_rss_kib") / 1024.0,
        f("agent_peak_rss_kib") / 1024.0
    );
}
