//! `cargo xtask up`: the local quickstart, as far as the project has come.
//!
//! Today: installs dependencies, builds Tether, starts a management API (etcd +
//! kube-apiserver + controller-manager + scheduler from the pinned binaries), installs the
//! tether.dev CRDs and shows them. Then it says plainly which parts of the quickstart do not
//! exist yet. It runs until Ctrl-C (or exits at once with `--exit`).

use std::io::Write;
use std::process::{Command, Stdio};

use tether_testkit::{ClusterOptions, TestCluster};
use tether_upstream::Component;

use crate::deps;
use crate::error::Error;
use crate::steps::{run as run_step, timed, workspace_root};

/// What the quickstart still lacks, with the issue that delivers it.
const MISSING: &[&str] = &[
    "tenant control plane (`tether-operator standalone` + TenantControlPlane) — issue #3",
    "PXE server on a private bridge (`tether-pxe`) — issue #4",
    "boot image (`tether-image build`) — issue #5",
    "two qemu workers that PXE-boot and join the tenant — agent issues",
];

/// Runs the quickstart.
pub fn run(exit: bool) -> Result<(), Error> {
    timed("deps", || deps::run(true).map(|_| ()))?;
    timed("build tether", || {
        run_step("build", "cargo", &["build", "--workspace", "--bins"])
    })?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| Error::Step {
        step: "tokio".into(),
        detail: e.to_string(),
    })?;
    runtime.block_on(async {
        let cluster = timed_async(
            "management plane",
            TestCluster::start_with(ClusterOptions::full()),
        )
        .await?;
        timed("install tether.dev CRDs", || apply_crds(&cluster))?;
        let out_dir = workspace_root().join("target/tether-up");
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::Step {
            step: "output dir".into(),
            detail: e.to_string(),
        })?;
        let kubeconfig = out_dir.join("management.kubeconfig");
        std::fs::copy(cluster.kubeconfig(), &kubeconfig).map_err(|e| Error::Step {
            step: "copy kubeconfig".into(),
            detail: e.to_string(),
        })?;
        println!("\nmanagement kubeconfig: {}", kubeconfig.display());
        print!("{}", cluster.kubectl(&["get", "crds"])?);
        println!("\nnot part of the quickstart yet:");
        for m in MISSING {
            println!("  - {m}");
        }
        if exit {
            println!("\n--exit given: tearing down");
        } else {
            println!("\nrunning; press Ctrl-C to stop and clean up");
            let _ = tokio::signal::ctrl_c().await;
        }
        Ok(())
    })
}

async fn timed_async<T, F>(name: &str, fut: F) -> Result<T, Error>
where
    F: std::future::Future<Output = tether_testkit::Result<T>>,
{
    println!("==> {name}");
    let start = std::time::Instant::now();
    let r = fut.await;
    println!(
        "<== {name}: {} in {}",
        if r.is_ok() { "ok" } else { "FAILED" },
        crate::steps::fmt_duration(start.elapsed())
    );
    Ok(r?)
}

fn apply_crds(cluster: &TestCluster) -> Result<(), Error> {
    let operator = workspace_root().join("target/debug/tether-operator");
    let crds = Command::new(&operator)
        .arg("crds")
        .output()
        .map_err(|e| Error::Step {
            step: "tether-operator crds".into(),
            detail: e.to_string(),
        })?;
    if !crds.status.success() {
        return Err(Error::Step {
            step: "tether-operator crds".into(),
            detail: String::from_utf8_lossy(&crds.stderr).into_owned(),
        });
    }
    let kubectl = tether_testkit::binaries::binary(Component::Kubectl)?;
    let mut child = Command::new(kubectl)
        .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
        .args(["apply", "--server-side", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Step {
            step: "kubectl apply".into(),
            detail: e.to_string(),
        })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&crds.stdout)
        .map_err(|e| Error::Step {
            step: "kubectl apply".into(),
            detail: e.to_string(),
        })?;
    let status = child.wait().map_err(|e| Error::Step {
        step: "kubectl apply".into(),
        detail: e.to_string(),
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Step {
            step: "kubectl apply".into(),
            detail: format!("exited with {status}"),
        })
    }
}
