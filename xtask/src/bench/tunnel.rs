//! `cargo xtask bench tunnel`: tether-agent's konnectivity tunnel against the upstream Go
//! `konnectivity-agent` (the reference), same konnectivity-server, node, pod and run —
//! measured by the ignored site test `tunnel::bench_tunnel`
//! (`tests/vm/tests/site/tunnel.rs`): port-forward throughput of a 100 MiB file (median of
//! 3), the API server's pod-proxy latency (one dial through the tunnel per request) p50/p99
//! with 1 and 64 concurrent streams, and the agent's resident memory idle and under that
//! load. The test prints one `bench: {json}` line per agent; this prints the table with
//! ratios (ours / Go). Goal: throughput ≥ 1.0×, p99 ≤ 1.0×. The image carries a release
//! build of the agent for this run (upstream's agent is an optimised Go build).

use std::process::Stdio;

use serde_json::Value;

use crate::error::Error;
use crate::steps::workspace_root;

const TEST: &str = "tunnel::bench_tunnel";

fn fail(what: impl std::fmt::Display) -> Error {
    Error::Usage(format!("bench tunnel: {what}"))
}

/// Runs the tunnel benchmark once and prints its figures.
pub fn run() -> Result<(), Error> {
    eprintln!("bench tunnel: running {TEST} (site, image, tenant, one nspawn node: ~6 min)");
    let out = crate::steps::cargo()
        .current_dir(workspace_root())
        .args(["test", "-p", "tether-vm-tests", "--test", "site", "--"])
        .args(["--ignored", "--exact", TEST, "--nocapture"])
        // The image gets an optimised agent: the reference is upstream's optimised build.
        .env("TETHER_TEST_RELEASE_AGENT", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(fail)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(fail(format!("the test failed:\n{stdout}")));
    }
    let runs: Vec<Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("bench: "))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let by = |agent: &str| {
        runs.iter()
            .find(|r| r["agent"] == agent)
            .cloned()
            .ok_or_else(|| fail(format!("no figures for {agent}")))
    };
    print(&by("tether")?, &by("upstream-go")?);
    Ok(())
}

fn median(v: &Value) -> f64 {
    let mut xs: Vec<f64> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

fn print(ours: &Value, go: &Value) {
    let cmd = "cargo xtask bench tunnel";
    println!("| figure | tether-agent | upstream Go agent | ratio | command |");
    println!("|---|---|---|---|---|");
    let (a, b) = (median(&ours["forward_mb_s"]), median(&go["forward_mb_s"]));
    println!(
        "| port-forward 100 MiB, MB/s (median of 3) | {a:.1} | {b:.1} | {:.2}× | `{cmd}` |",
        a / b
    );
    for (x, y) in ours["latency"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(go["latency"].as_array().into_iter().flatten())
    {
        for q in ["p50_ms", "p99_ms"] {
            let (a, b) = (x[q].as_f64().unwrap_or(0.0), y[q].as_f64().unwrap_or(0.0));
            println!(
                "| pod proxy, {} streams, {} requests, {} | {a:.1} ms | {b:.1} ms | {:.2}× | `{cmd}` |",
                x["streams"],
                x["requests"],
                q.trim_end_matches("_ms"),
                a / b
            );
        }
    }
    for k in ["rss_kib_idle", "rss_kib_peak"] {
        let (a, b) = (
            ours[k].as_f64().unwrap_or(0.0),
            go[k].as_f64().unwrap_or(0.0),
        );
        println!(
            "| agent RSS {} (tether-agent: the whole agent) | {:.1} MiB | {:.1} MiB | {:.2}× | `{cmd}` |",
            if k.ends_with("idle") {
                "idle"
            } else {
                "peak under load"
            },
            a / 1024.0,
            b / 1024.0,
            a / b
        );
    }
}
