//! The workers: N qemu VMs (TCG) on the segment that PXE-boot through tether-pxe — or, with
//! `--cloud-init`, boot `disk.raw` under OVMF with a NoCloud `cidata` volume carrying a
//! single-use token that pre-assigns the machine to the pool — and the watch that prints
//! each one's way from power-on to a Ready node: its console's own lines, its Machine's
//! phases, its Node's Ready condition, each timed from its power-on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tether_testkit::qemu::{Vm, tail};
use tether_vm_tests::node::{CONSOLE_MARKS, Tenant, machine_of};
use tether_vm_tests::site::Site;

use super::interrupt;
use crate::error::Error;
use crate::steps::fmt_duration;

/// RAM per VM: a diskless node keeps its runtime, images and pods' layers in RAM.
const MEMORY_MIB: u32 = 2560;

/// How the workers boot.
pub enum Boot {
    /// From the network: SeaBIOS, qemu's iPXE, tether-pxe (proxyDHCP).
    Pxe,
    /// `disk.raw` (copied per VM) with a NoCloud seed naming `pool` (`namespace/name`).
    CloudInit { disk: PathBuf, pool: String },
}

/// One worker VM and what it went through, timed from its power-on.
pub struct Worker {
    /// `worker-<n>`: its serial log is `<name>.serial` in the run directory.
    pub name: String,
    /// Its Machine (and Node) name, from its MAC.
    pub machine: String,
    /// The VM; killed on drop.
    pub vm: Vm,
    /// (step, time since power-on), in the order seen.
    pub steps: Vec<(String, Duration)>,
    phase: Option<String>,
    ready: bool,
}

/// vCPUs per VM: the host's cores shared out, at least one. TCG VMs whose vCPUs outnumber
/// the cores starve each other: two 2-vCPU workers on 2 cores hit soft lockups of up to
/// 115 s in the kubelet and one never turned Ready (measured).
pub fn vcpus(workers: u32) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    vcpus_for(cores, workers)
}

fn vcpus_for(cores: u32, workers: u32) -> u32 {
    (cores / workers.max(1)).clamp(1, 2)
}

/// Powers on `count` workers.
pub fn power_on(site: &Site, count: u32, boot: &Boot) -> Result<Vec<Worker>, Error> {
    let vcpus = vcpus(count);
    (1..=count)
        .map(|i| {
            let name = format!("worker-{i}");
            // A fixed, locally administered MAC per worker: the segment is private to this run.
            let mac = format!("52:54:00:7e:00:{i:02x}");
            let vm = match boot {
                Boot::Pxe => site
                    .vm_on_segment(&name, &mac, MEMORY_MIB)
                    .vcpus(vcpus)
                    .args(["-boot", "n"])
                    .spawn()
                    .map_err(Error::from)?,
                Boot::CloudInit { disk, pool } => {
                    let user_data = site.token(&[
                        "create",
                        "--ttl",
                        "1h",
                        "--uses",
                        "1",
                        "--pool",
                        pool,
                        "--user-data",
                    ]);
                    let seed = site
                        .cidata_volume(&format!("{name}-cidata"), &user_data)
                        .map_err(step_err)?;
                    site.disk_vm(&name, &mac, MEMORY_MIB, vcpus, disk, &seed)
                        .map_err(step_err)?
                }
            };
            println!(
                "    {name}: qemu pid {}, {vcpus} vCPU, MAC {mac}, Machine {}, serial log {}",
                vm.pid(),
                machine_of(&mac),
                vm.serial_path().display()
            );
            Ok(Worker {
                name,
                machine: machine_of(&mac),
                vm,
                steps: Vec::new(),
                phase: None,
                ready: false,
            })
        })
        .collect()
}

fn step_err(detail: String) -> Error {
    Error::Step {
        step: "workers".into(),
        detail,
    }
}

/// Watches every worker until its Node is Ready, printing each step as it happens; fails
/// after `timeout`, on Ctrl-C, or when a VM or the site's processes exit.
pub fn wait_ready(
    site: &Site,
    tenant: &Tenant,
    workers: &mut [Worker],
    timeout: Duration,
) -> Result<(), Error> {
    let start = Instant::now();
    let mut last_poll: Option<Instant> = None;
    while workers.iter().any(|w| !w.ready) {
        interrupt::check("workers")?;
        site.check_running().map_err(step_err)?;
        for w in workers.iter_mut() {
            w.check_alive("workers")?;
            w.console_steps();
        }
        // The API servers once a second: each poll is two kubectl runs on a busy machine.
        if last_poll.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_poll = Some(Instant::now());
            let phases = listing(site.kubectl(&[
                "get",
                "machines",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.phase}{\"\\n\"}{end}",
            ]));
            let nodes = listing(tenant.kubectl(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ]));
            for w in workers.iter_mut() {
                w.api_steps(phases.get(&w.machine), nodes.get(&w.machine));
            }
        }
        if start.elapsed() > timeout {
            let late: Vec<String> = workers
                .iter()
                .filter(|w| !w.ready)
                .map(|w| {
                    format!(
                        "{} (Machine {}, phase {}), serial log {}:\n{}",
                        w.name,
                        w.machine,
                        w.phase.as_deref().unwrap_or("none yet"),
                        w.vm.serial_path().display(),
                        tail(&w.vm.console(), 25)
                    )
                })
                .collect();
            return Err(step_err(format!(
                "not Ready after {}:\n{}\n--- operator log (tail) ---\n{}",
                fmt_duration(timeout),
                late.join("\n"),
                site.operator_log()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// `name=value` lines as a map (an error reads as empty: the next poll tries again).
fn listing(out: Result<String, String>) -> BTreeMap<String, String> {
    out.unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Worker {
    /// Fails, naming `phase`, the serial log and its tail, if qemu has exited.
    pub fn check_alive(&mut self, phase: &str) -> Result<(), Error> {
        match self.vm.exited() {
            None => Ok(()),
            Some(status) => Err(Error::Step {
                step: phase.into(),
                detail: format!(
                    "{} (qemu) exited ({status}); its serial log {}:\n{}",
                    self.name,
                    self.vm.serial_path().display(),
                    tail(&self.vm.console(), 30)
                ),
            }),
        }
    }

    fn record(&mut self, step: String) {
        let at = self.vm.elapsed();
        println!("    {:<9} {:>7}  {step}", self.name, fmt_duration(at));
        self.steps.push((step, at));
    }

    /// The console lines of [`CONSOLE_MARKS`] that appeared since the last look.
    fn console_steps(&mut self) {
        let console = self.vm.console();
        for (what, marker) in CONSOLE_MARKS {
            if !self.steps.iter().any(|(s, _)| s == what) && console.contains(marker) {
                self.record(what.to_string());
            }
        }
    }

    /// A new Machine phase, and the Node's Ready condition.
    fn api_steps(&mut self, phase: Option<&String>, node_ready: Option<&String>) {
        if let Some(p) = phase.filter(|p| !p.is_empty())
            && self.phase.as_ref() != Some(p)
        {
            self.phase = Some(p.clone());
            self.record(format!("Machine {p}"));
        }
        if !self.ready && node_ready.is_some_and(|s| s == "True") {
            self.ready = true;
            self.record("Node Ready".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{listing, vcpus_for};

    #[test]
    fn vcpus_share_the_cores_out_one_to_two_each() {
        for (cores, workers, want) in [
            (2, 1, 2),
            (2, 2, 1),
            (2, 3, 1),
            (8, 2, 2),
            (4, 2, 2),
            (1, 1, 1),
            (2, 0, 2),
        ] {
            assert_eq!(
                vcpus_for(cores, workers),
                want,
                "{cores} cores, {workers} workers"
            );
        }
    }

    #[test]
    fn listing_reads_name_value_lines_and_treats_errors_as_empty() {
        let m = listing(Ok("mac-1=Ready\nmac-2=\nnoise\n".into()));
        assert_eq!(m.get("mac-1").map(String::as_str), Some("Ready"));
        assert_eq!(m.get("mac-2").map(String::as_str), Some(""));
        assert_eq!(m.len(), 2);
        assert!(listing(Err("connection refused".into())).is_empty());
    }
}
