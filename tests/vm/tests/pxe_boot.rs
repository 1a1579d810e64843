//! Real PXE boots through tether-pxe alone: a network namespace with a bridge and a tap,
//! tether-pxe serving full DHCP + TFTP + HTTP on the bridge, and qemu (TCG) booting from the
//! network — once with SeaBIOS and qemu's iPXE option ROM, once with OVMF (UEFI), whose own
//! PXE client fetches `ipxe.efi` over TFTP. The machine boots Debian's kernel and a busybox
//! initramfs made here that prints a marker (and the command line iPXE gave it) on serial
//! and powers off.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_testkit::NetNs;

/// A TCG boot takes ~20 s with SeaBIOS; OVMF plus a TFTP stage is slower. Generous, bounded.
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);
const MARKER: &str = "TETHER-PXE-BOOT-OK";

/// Kills (and reaps) a child on drop.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds (if needed) and returns the tether-pxe binary of this target dir.
fn tether_pxe_binary() -> PathBuf {
    run(Command::new(env!("CARGO")).args([
        "build",
        "-q",
        "-p",
        "tether-pxe",
        "--bin",
        "tether-pxe",
    ]));
    let exe = std::env::current_exe().expect("test exe path");
    // target/<profile>/deps/<test> → target/<profile>/tether-pxe
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .join("tether-pxe");
    assert!(bin.is_file(), "{} missing after cargo build", bin.display());
    bin
}

/// Debian's kernel: the newest /boot/vmlinuz-*.
fn debian_kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("read /boot")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .expect("no /boot/vmlinuz-*: install linux-image-amd64 (cargo xtask deps does)")
}

/// A newc cpio with static busybox and an /init that prints the marker and /proc/cmdline on
/// the first serial port, then powers off.
fn busybox_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    for d in ["bin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("copy /bin/busybox (install busybox-static)");
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         /bin/busybox mount -t proc proc /proc\n\
         echo \"{MARKER} cmdline: $(/bin/busybox cat /proc/cmdline)\" > /dev/ttyS0\n\
         /bin/busybox poweroff -f\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    run(Command::new("chmod").args(["0755"]).arg(root.join("init")));
    let out = dir.join("initramfs.cpio");
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            out.display()
        ))
        .status()
        .expect("run cpio");
    assert!(cpio.success(), "cpio failed");
    out
}

#[derive(Clone, Copy, Debug)]
enum Firmware {
    SeaBios,
    Ovmf,
}

fn read_file(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

fn pxe_boot(fw: Firmware, mac: &str) {
    let dir = tether_testkit::test_dir("tether-pxe-boot-").expect("test dir");
    let d = dir.path();
    let pxe = tether_pxe_binary();
    let kernel = debian_kernel();
    let initrd = busybox_initramfs(d);
    let config = d.join("pxe.toml");
    std::fs::write(
        &config,
        format!(
            "default_image = \"marker\"\n\
             [images.marker]\nversion = \"test-1\"\n\
             cmdline = \"console=ttyS0 panic=-1\"\n\
             kernel = \"{}\"\ninitrd = \"{}\"\n",
            kernel.display(),
            initrd.display()
        ),
    )
    .unwrap();

    let ns = NetNs::create().expect("netns");
    ns.add_bridge("br0", Some("10.99.0.1/24")).expect("bridge");
    ns.add_tap("tap0", Some("br0")).expect("tap");

    let pxe_log = d.join("tether-pxe.log");
    let _server = Guard(
        ns.command(&pxe)
            .args(["serve", "--interface", "br0", "--full-dhcp"])
            .args(["--pool-start", "10.99.0.100", "--pool-end", "10.99.0.120"])
            .arg("--lease-file")
            .arg(d.join("leases.json"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,tether_pxe::dhcp=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&pxe_log).unwrap())
            .spawn()
            .expect("start tether-pxe"),
    );
    // Wait until it listens (the log line is written after every socket is bound).
    let start = Instant::now();
    while !read_file(&pxe_log).contains("tether-pxe serving") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "tether-pxe did not start:\n{}",
            read_file(&pxe_log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let serial = d.join("serial.log");
    let mut qemu = ns.command("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-m", "768", "-smp", "1"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        // OVMF must use its own PXE client (not qemu's iPXE EFI ROM) so that the firmware
        // stage — arch 7, TFTP of ipxe.efi — is exercised.
        .args([
            "-device",
            &match fw {
                Firmware::SeaBios => format!("virtio-net-pci,netdev=n0,mac={mac}"),
                Firmware::Ovmf => format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
            },
        ])
        .args(["-boot", "n"]);
    if let Firmware::Ovmf = fw {
        let vars = d.join("OVMF_VARS.fd");
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF vars (install ovmf)");
        qemu.args([
            "-drive",
            "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        ])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    }
    let qemu_log = d.join("qemu.log");
    let mut vm = Guard(
        qemu.stdout(Stdio::null())
            .stderr(std::fs::File::create(&qemu_log).unwrap())
            .spawn()
            .expect("start qemu"),
    );

    let start = Instant::now();
    loop {
        let out = read_file(&serial);
        if out.contains(MARKER) {
            break;
        }
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!(
                "{fw:?}: qemu exited ({status}) before the marker.\nserial:\n{out}\nqemu:\n{}\ntether-pxe:\n{}",
                read_file(&qemu_log),
                read_file(&pxe_log)
            );
        }
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "{fw:?}: no marker after {BOOT_TIMEOUT:?}.\nserial tail:\n{}\ntether-pxe:\n{}",
            out.chars()
                .rev()
                .take(3000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>(),
            read_file(&pxe_log)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("{fw:?}: booted to the marker in {:?}", start.elapsed());
    let out = read_file(&serial);
    let line = out.lines().find(|l| l.contains(MARKER)).unwrap();
    assert!(
        line.contains(&format!("tether.mac={mac}")),
        "the kernel got our per-machine command line: {line}"
    );
    assert!(line.contains("initrd=initrd"), "{line}");
    // The machine powers itself off.
    let off = Instant::now();
    while vm.0.try_wait().ok().flatten().is_none() {
        assert!(
            off.elapsed() < Duration::from_secs(60),
            "{fw:?}: VM did not power off"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = read_file(&pxe_log);
    assert!(log.contains("served boot script"), "{log}");
    assert!(log.contains("boot beacon"), "{log}");
    if let Firmware::Ovmf = fw {
        assert!(
            log.lines()
                .any(|l| l.contains("tftp transfer complete") && l.contains("ipxe.efi")),
            "OVMF fetched ipxe.efi over TFTP:\n{log}"
        );
    }
}

#[test]
fn seabios_ipxe_rom_boots_through_tether_pxe() {
    pxe_boot(Firmware::SeaBios, "52:54:00:7e:00:01");
}

#[test]
fn ovmf_boots_ipxe_efi_over_tftp_through_tether_pxe() {
    pxe_boot(Firmware::Ovmf, "52:54:00:7e:00:02");
}
