//! qemu VMs for tests and benchmarks: always `-accel tcg` (this project's machines have no
//! usable KVM), no display or monitor, `-no-reboot`, the serial console written to a file
//! that [`Vm::wait_for`] watches. The VM runs in its own process group recorded in
//! [`crate::state`], so the next run kills it if its owner died without dropping it; it is
//! killed on drop.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Debian's OVMF firmware (package `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
/// The pristine OVMF variable store, copied per VM because firmware writes to it.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// A qemu command line being put together.
pub struct Qemu {
    cmd: Command,
    serial: PathBuf,
}

impl Qemu {
    /// A TCG VM with `memory_mib` of RAM and 2 vCPUs, its console in `serial` (truncated),
    /// and no NIC unless [`Qemu::arg`] adds one.
    pub fn new(serial: &Path, memory_mib: u32) -> Qemu {
        Qemu::with_command(Command::new("qemu-system-x86_64"), serial, memory_mib)
    }

    /// Like [`Qemu::new`], with qemu inside the network namespace `ns` (so that its tap
    /// NICs, made there, are on that namespace's bridges).
    pub fn new_in(ns: &crate::NetNs, serial: &Path, memory_mib: u32) -> Qemu {
        Qemu::with_command(ns.command("qemu-system-x86_64"), serial, memory_mib)
    }

    fn with_command(mut cmd: Command, serial: &Path, memory_mib: u32) -> Qemu {
        let _ = fs::remove_file(serial);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
            .args(["-m", &memory_mib.to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()));
        Qemu {
            cmd,
            serial: serial.to_path_buf(),
        }
    }

    /// Boots `kernel` directly with `initrd` and the kernel command line `append`.
    pub fn direct_boot(mut self, kernel: &Path, initrd: &Path, append: &str) -> Qemu {
        self.cmd
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(append);
        self
    }

    /// UEFI firmware (q35 + OVMF), with a fresh copy of the variable store at `vars`.
    pub fn ovmf(mut self, vars: &Path) -> Result<Qemu> {
        fs::copy(OVMF_VARS, vars).map_err(|_| Error::MissingTool {
            tool: OVMF_VARS.into(),
            hint: "install ovmf (cargo xtask deps does)".into(),
        })?;
        self.cmd
            .args(["-machine", "q35", "-drive"])
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
        Ok(self)
    }

    /// `n` vCPUs instead of 2 (a later `-smp` overrides the earlier one): TCG VMs whose
    /// vCPUs outnumber the host's cores starve each other into soft lockups.
    pub fn vcpus(self, n: u32) -> Qemu {
        self.args(["-smp", &n.max(1).to_string()])
    }

    /// Adds raw arguments (drives, NICs, boot order, …).
    pub fn args<I, S>(mut self, args: I) -> Qemu
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Starts the VM.
    pub fn spawn(mut self) -> Result<Vm> {
        let child = self
            .cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|_| Error::MissingTool {
                tool: "qemu-system-x86_64".into(),
                hint: "install qemu-system-x86 (cargo xtask deps does)".into(),
            })?;
        let record = crate::state::record_process_group(child.id());
        let mut vm = Vm {
            child,
            serial: self.serial,
            started: Instant::now(),
            record: None,
        };
        vm.record = Some(record?);
        Ok(vm)
    }
}

/// A running VM; killed on drop.
pub struct Vm {
    child: Child,
    serial: PathBuf,
    started: Instant,
    record: Option<PathBuf>,
}

impl Vm {
    /// Everything the serial console printed so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// qemu's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial console's file.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// Time since qemu was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the console shows `want` and returns the time since spawn; fails with the
    /// console's tail when it shows `refuse` (if not empty) first, when qemu exits, or after
    /// `timeout`.
    pub fn wait_for(&mut self, want: &str, refuse: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let text = self.console();
            let fail = |reason: String| Error::NotReady {
                component: "qemu VM".into(),
                seconds: timeout.as_secs(),
                reason,
                log_tail: tail(&text, 40),
            };
            if text.contains(want) {
                return Ok(self.started.elapsed());
            }
            if !refuse.is_empty() && text.contains(refuse) {
                return Err(fail(format!("console shows {refuse:?} before {want:?}")));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(fail(format!("qemu exited ({status}) before {want:?}")));
            }
            if start.elapsed() > timeout {
                return Err(fail(format!("no {want:?} on the console")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// qemu's exit status if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for qemu to exit on its own (e.g. the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.record.take() {
            let _ = fs::remove_file(r);
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
