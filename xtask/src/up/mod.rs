//! `cargo xtask up`: the whole quickstart on one machine.
//!
//! 1. installs what is missing and builds Tether;
//! 2. claims its directory ([`workdir`]): cleans up after a killed earlier run;
//! 3. builds the node image unless it is unchanged ([`image`]);
//! 4. starts the site: a network namespace with a private bridge and the site's own DHCP
//!    server, `tether-operator standalone` publishing the management plane, the machine API
//!    and the tenants on the bridge's uplink, the image as a BootImage, and `tether-pxe` in
//!    proxyDHCP mode beside that DHCP server (the same site the VM tests boot);
//! 5. creates the `quickstart` TenantControlPlane and fills the artifact store;
//! 6. applies the WorkerPool `quickstart` and powers on the workers ([`machines`]), which
//!    PXE-boot (or boot `disk.raw` with a NoCloud seed), enroll, are claimed, join and turn
//!    Ready;
//! 7. runs the Deployment `hello` on them and prints where everything is;
//! 8. waits for Ctrl-C (or goes on at once with `--exit`), tears everything down and checks
//!    that nothing is left: no qemu, no process, no namespace, no mount.
//!
//! Every phase prints as it starts and ends with its duration; a failure names the phase,
//! the log to read and its last lines.

mod image;
mod interrupt;
mod machines;
mod workdir;

use std::path::Path;
use std::time::{Duration, Instant};

use tether_testkit::qemu::Vm;
use tether_upstream::Pins;
use tether_vm_tests::image::Built;
use tether_vm_tests::node::{Tenant, push_store, worker_pool_yaml};
use tether_vm_tests::site::{Site, SiteConfig};

use crate::deps;
use crate::error::Error;
use crate::steps::{fmt_duration, run as run_step, timed};
use machines::{Boot, Worker};

/// The tenant, its pool and its Deployment are all called this (namespace `default`).
const NAME: &str = "quickstart";

/// How long the workers may take from power-on to Ready (TCG, all on two cores).
const WORKERS_TIMEOUT: Duration = Duration::from_secs(900);

/// How long the Deployment may take to have every replica ready.
const DEPLOYMENT_TIMEOUT: Duration = Duration::from_secs(300);

/// What `up` was asked for.
pub struct Options {
    /// Worker VMs to boot.
    pub workers: u32,
    /// Boot `disk.raw` with a NoCloud seed instead of PXE.
    pub cloud_init: bool,
    /// Tear down once everything is Ready instead of waiting for Ctrl-C.
    pub exit: bool,
}

/// What `up` started; torn down on drop, the VMs first.
struct Running {
    workers: Vec<Worker>,
    site: Site,
    namespace: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let vms: Vec<Vm> = self.workers.drain(..).map(|w| w.vm).collect();
        drop(vms);
        self.site.stop();
    }
}

/// Runs the quickstart.
pub fn run(opts: Options) -> Result<(), Error> {
    interrupt::install()?;
    let total = Instant::now();
    // First the lock: a second `up` stops before it installs or builds anything.
    let dir = workdir::WorkDir::claim()?;
    timed("deps", || deps::run(true).map(|_| ()))?;
    timed("build tether (cargo build --workspace --bins)", || {
        run_step("build", "cargo", &["build", "--workspace", "--bins"])
    })?;
    timed("up directory (cleans up after an earlier run)", || {
        dir.fresh_run()
    })?;
    let run_dir = dir.run();
    let built = timed("node image", || image::ensure(&dir.root, opts.cloud_init))?;
    // The site keeps a reference for its whole life, which is this process's.
    let built: &'static _ = Box::leak(Box::new(built));
    interrupt::check("node image")?;

    let started = timed("site: segment, management plane, tether-pxe", || {
        let bins = workdir::target_dir().join("debug");
        let site = Site::start_with(SiteConfig {
            dir: run_dir.clone(),
            image: built,
            operator: bins.join("tether-operator"),
            pxe: bins.join("tether-pxe"),
        })
        .map_err(|e| Error::Step {
            step: "site".into(),
            detail: format!("{e}\n(logs in {})", run_dir.display()),
        })?;
        println!(
            "    segment {}/24 in namespace {}; machine API {}; tether-pxe {} (proxyDHCP)",
            site.host_ip,
            site.namespace(),
            site.api_url,
            site.pxe_url
        );
        Ok(Running {
            workers: Vec::new(),
            namespace: site.namespace(),
            site,
        })
    });
    let (running, result) = match started {
        Ok(mut running) => {
            let result = bring_up(&mut running, &opts, built, &run_dir, total);
            (Some(running), result)
        }
        Err(e) => (None, Err(e)),
    };
    let result = result.map_err(|e| {
        if interrupt::interrupted() {
            Error::Step {
                step: "up".into(),
                detail: format!("interrupted (Ctrl-C or SIGTERM): {e}"),
            }
        } else {
            e
        }
    });
    if result.is_err() {
        println!("    failed (the error follows below); tearing down");
    }
    let torn_down = timed("teardown", || teardown(running, &dir));
    println!(
        "logs stay in {} until the next `cargo xtask up`",
        run_dir.display()
    );
    match (result, torn_down) {
        (Err(Error::Step { step, detail }), Err(left)) => Err(Error::Step {
            step,
            detail: format!("{detail}\n\nand the teardown: {left}"),
        }),
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Stops the VMs, tether-pxe, the management plane and the segment; kills what the
/// management plane's pidfiles still name (its supervised processes sit in process groups
/// of their own); fails with whatever is still there.
fn teardown(running: Option<Running>, dir: &workdir::WorkDir) -> Result<(), Error> {
    let namespaces: Vec<String> = running.iter().map(|r| r.namespace.clone()).collect();
    drop(running);
    let killed = dir.reap_run_pidfiles();
    let mut left = workdir::leftovers(&dir.root, &namespaces);
    if killed > 0 {
        left.push(format!(
            "{killed} processes of the management plane outlived its stop (killed now)"
        ));
    }
    if left.is_empty() {
        println!("    nothing left: no qemu, no process, no namespace, no mount");
        Ok(())
    } else {
        Err(Error::Step {
            step: "teardown".into(),
            detail: format!("left behind:\n{}", left.join("\n")),
        })
    }
}

/// Everything after the site: the tenant, the store, the workers, the Deployment, the
/// report, and (without `--exit`) the wait for Ctrl-C.
fn bring_up(
    running: &mut Running,
    opts: &Options,
    built: &'static Built,
    run_dir: &Path,
    total: Instant,
) -> Result<(), Error> {
    interrupt::check("site")?;
    let site = &running.site;
    let tenant = timed("tenant control plane `quickstart`", || {
        Tenant::try_create(site, NAME, Duration::from_secs(180)).map_err(|e| Error::Step {
            step: "tenant".into(),
            detail: format!(
                "{e}\n--- {} (tail) ---\n{}",
                run_dir.join("operator.log").display(),
                site.operator_log()
            ),
        })
    })?;
    interrupt::check("tenant")?;
    timed("artifact store: node binaries and container images", || {
        push_store(site).map_err(|detail| Error::Step {
            step: "artifact store".into(),
            detail,
        })
    })?;
    interrupt::check("artifact store")?;

    let boot = if opts.cloud_init {
        Boot::CloudInit {
            disk: built.dir.join("disk.raw"),
            pool: format!("default/{NAME}"),
        }
    } else {
        Boot::Pxe
    };
    running.workers = timed(
        &format!(
            "WorkerPool `{NAME}` ({} replicas) and its VMs",
            opts.workers
        ),
        || {
            let pool = worker_pool_yaml(NAME, NAME, opts.workers, None, None, "{}");
            apply(&|a| site.kubectl(a), run_dir, "workerpool", &pool)?;
            machines::power_on(site, opts.workers, &boot)
        },
    )?;
    let Running { site, workers, .. } = running;
    timed(
        "workers: boot, enroll, claim, install, join, Node Ready",
        || machines::wait_ready(site, &tenant, workers, WORKERS_TIMEOUT),
    )?;
    if opts.workers > 0 {
        timed("Deployment `hello`", || {
            deploy_hello(&tenant, run_dir, opts.workers)
        })?;
    }
    report(&tenant, workers, run_dir, total.elapsed());
    if !opts.exit {
        println!("\nrunning; Ctrl-C tears it all down");
        wait_interrupt(site, workers)?;
        println!();
    }
    Ok(())
}

/// `kubectl apply` of `yaml` with `kubectl`, written to `<dir>/<file>.yaml` first (so the
/// user can read it).
fn apply(
    kubectl: &dyn Fn(&[&str]) -> Result<String, String>,
    dir: &Path,
    file: &str,
    yaml: &str,
) -> Result<(), Error> {
    let path = dir.join(format!("{file}.yaml"));
    std::fs::write(&path, yaml).map_err(|e| Error::Step {
        step: file.into(),
        detail: format!("write {}: {e}", path.display()),
    })?;
    kubectl(&["apply", "-f", &path.display().to_string()])
        .map(drop)
        .map_err(|detail| Error::Step {
            step: format!("apply {}", path.display()),
            detail,
        })
}

/// A Deployment of `replicas` small web servers spread over the nodes, from the image the
/// store holds (busybox httpd; no registry involved).
fn deploy_hello(tenant: &Tenant, dir: &Path, replicas: u32) -> Result<(), Error> {
    let image = tether_image::containers::ContainerImage::TestShell.reference(&Pins::default());
    let yaml = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: hello, namespace: default}}\n\
         spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: hello}}}}\n  template:\n\
         \x20   metadata: {{labels: {{app: hello}}}}\n    spec:\n\
         \x20     topologySpreadConstraints:\n\
         \x20     - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, \
         whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{app: hello}}}}}}\n\
         \x20     containers:\n      - name: hello\n        image: {image}\n\
         \x20       env: [{{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}]\n\
         \x20       command: [sh, -c, 'mkdir -p /www && echo \"hello from $NODE\" > /www/index.html \
         && exec httpd -f -p 8080 -h /www']\n\
         \x20       readinessProbe: {{httpGet: {{port: 8080, path: /}}, periodSeconds: 2}}\n"
    );
    let step = |detail: String| Error::Step {
        step: "Deployment hello".into(),
        detail,
    };
    apply(&|a| tenant.kubectl(a), dir, "hello", &yaml)?;
    let want = replicas.to_string();
    tenant
        .wait(
            "deployment/hello",
            "{.status.readyReplicas}",
            &want,
            DEPLOYMENT_TIMEOUT,
        )
        .map_err(|e| {
            step(format!(
                "{e}\n{}",
                tenant
                    .kubectl(&["get", "pods", "-o", "wide"])
                    .unwrap_or_default()
            ))
        })
}

/// Where everything is, the nodes and pods, and each worker's way to Ready.
fn report(tenant: &Tenant, workers: &[Worker], dir: &Path, took: Duration) {
    let kubeconfig = tenant.admin.display();
    println!("\nquickstart ready in {}", fmt_duration(took));
    println!("tenant kubeconfig: {kubeconfig}");
    println!(
        "management kubeconfig: {}",
        dir.join("standalone/management.kubeconfig").display()
    );
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-o", "wide"][..],
    ] {
        println!("\n$ kubectl --kubeconfig {kubeconfig} {}", args.join(" "));
        match tenant.kubectl(args) {
            Ok(out) => print!("{out}"),
            Err(e) => println!("(failed: {})", e.trim()),
        }
    }
    for w in workers {
        println!(
            "\n{} (Machine {}): serial log `tail -f {}`",
            w.name,
            w.machine,
            w.vm.serial_path().display()
        );
        let mut prev = Duration::ZERO;
        for (step, at) in &w.steps {
            println!(
                "    {:>7}  (+{:>6})  {step}",
                fmt_duration(*at),
                fmt_duration(at.saturating_sub(prev))
            );
            prev = *at;
        }
    }
    println!(
        "\nlogs: {dir}/operator.log, {dir}/pxe.log, {dir}/dnsmasq.log",
        dir = dir.display()
    );
}

/// Waits for Ctrl-C or SIGTERM; fails if a VM or the site's processes die meanwhile.
fn wait_interrupt(site: &Site, workers: &mut [Worker]) -> Result<(), Error> {
    while !interrupt::interrupted() {
        site.check_running().map_err(|detail| Error::Step {
            step: "running".into(),
            detail,
        })?;
        for w in workers.iter_mut() {
            w.check_alive("running")?;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}
