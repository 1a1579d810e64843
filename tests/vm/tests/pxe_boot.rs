//! Real PXE boots of the real image through tether-pxe alone: a network namespace with a
//! bridge and a tap, tether-pxe (full DHCP + TFTP + HTTP, the TOML source) on the bridge
//! serving the image `tether-image` builds from `image-builder/examples/default.toml`, and
//! qemu (TCG) booting from the network — once with SeaBIOS and qemu's iPXE option ROM, once
//! with OVMF, whose own PXE client fetches `ipxe.efi` over TFTP — until the initramfs has
//! verified the rootfs it received as the cpio entry `/rootfs.img` and systemd has started
//! the agent.
//!
//! The two firmwares take the two rootfs paths of the boot script: under SeaBIOS iPXE wraps
//! the raw rootfs in a cpio entry itself (`initrd URL /rootfs.img mode=0400`); under OVMF
//! Debian's ipxe.efi cannot, so it loads tether-pxe's wrapped copy
//! (`/artifacts/sha256/<hex>/cpio/rootfs.img`). The test checks which one each used.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tether_boot::Token;
use tether_testkit::NetNs;
use tether_testkit::qemu::{self, Qemu};
use tether_vm_tests::image::{image, workspace_binary};

/// Each stage of a TCG boot (firmware + iPXE + ~120 MB over HTTP + kernel; then systemd to
/// the agent) is bounded by this.
const STAGE_TIMEOUT: Duration = Duration::from_secs(900);
const SERVER: &str = "10.99.0.1";
const API_URL: &str = "https://10.99.0.1:9443";

/// Kills (and reaps) a child on drop.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, Debug)]
enum Firmware {
    SeaBios,
    Ovmf,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn pxe_boot(fw: Firmware, mac: &str) {
    let image = image();
    let pxe = workspace_binary("tether-pxe", "tether-pxe");
    let dir = tether_testkit::test_dir("tether-pxe-boot-").expect("test dir");
    let d = dir.path();
    let config = d.join("pxe.toml");
    std::fs::write(
        &config,
        format!(
            "default_image = \"tether\"\n\
             [images.tether]\nversion = \"{}\"\ncmdline = \"{}\"\n\
             kernel = \"{}\"\ninitrd = \"{}\"\nrootfs = \"{}\"\n",
            image.manifest.version,
            image.manifest.cmdline,
            image.dir.join("vmlinuz").display(),
            image.dir.join("initramfs").display(),
            image.dir.join("rootfs.squashfs").display(),
        ),
    )
    .unwrap();
    // The site-wide join token of the TOML source, and the machine API it points at.
    let token = Token::generate().unwrap();
    let token_file = d.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let pin = format!("sha256:{}", "5a".repeat(32));

    let ns = NetNs::create().expect("netns");
    ns.add_bridge("br0", Some(&format!("{SERVER}/24")))
        .expect("bridge");
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
            .args(["--api-url", API_URL, "--ca-pin", &pin])
            .arg("--token-file")
            .arg(&token_file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&pxe_log).unwrap())
            .spawn()
            .expect("start tether-pxe"),
    );
    // The log line is written once every socket is bound.
    let start = Instant::now();
    while !read(&pxe_log).contains("tether-pxe serving") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "tether-pxe did not start:\n{}",
            read(&pxe_log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let serial = d.join("serial.log");
    // OVMF must use its own PXE client (not qemu's iPXE EFI ROM) so that the firmware stage —
    // arch 7, TFTP of ipxe.efi — is exercised.
    let nic = match fw {
        Firmware::SeaBios => format!("virtio-net-pci,netdev=n0,mac={mac}"),
        Firmware::Ovmf => format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
    };
    let mut vm = Qemu::new_in(&ns, &serial, 2048);
    if let Firmware::Ovmf = fw {
        vm = vm
            .ovmf(&d.join("OVMF_VARS.fd"))
            .expect("OVMF (install ovmf)");
    }
    let mut vm = vm
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args(["-device", &nic, "-boot", "n"])
        .spawn()
        .expect("start qemu");
    let fail = |e: tether_testkit::Error| -> ! {
        panic!(
            "{fw:?}: {e}\ntether-pxe:\n{}",
            qemu::tail(&read(&pxe_log), 40)
        )
    };
    let verified = vm
        .wait_for(
            "tether-initramfs: rootfs verified",
            "REFUSING TO BOOT",
            STAGE_TIMEOUT,
        )
        .unwrap_or_else(|e| fail(e));
    let agent = vm
        .wait_for("tether-agent started", "REFUSING TO BOOT", STAGE_TIMEOUT)
        .unwrap_or_else(|e| fail(e));
    eprintln!(
        "{fw:?}: rootfs verified after {:.1}s, tether-agent started after {:.1}s (TCG)",
        verified.as_secs_f64(),
        agent.as_secs_f64()
    );
    // READY=1 reached systemd (its own "Started" line is no witness once the serial getty
    // owns the console).
    vm.wait_for(
        "ready: READY=1 sent to systemd",
        "Failed to start \u{1b}[0;1;39mtether-agent.service",
        STAGE_TIMEOUT,
    )
    .unwrap_or_else(|e| fail(e));
    let console = vm.console();
    // The kernel got the image's words and ours, rendered through BootParams.
    let line = console
        .lines()
        .find(|l| l.contains("Kernel command line:"))
        .unwrap_or_else(|| panic!("{fw:?}: no command line on the console"));
    for word in [
        "initrd=initrd".to_string(),
        "initrd=rootfs".to_string(),
        "tether.root=file:/rootfs.img".to_string(),
        format!("tether.mac={mac}"),
        format!("tether.api={API_URL}"),
        format!("tether.ca={pin}"),
        format!("tether.token={token}"),
    ] {
        assert!(line.contains(&word), "{fw:?}: {word} missing from {line}");
    }

    let log = read(&pxe_log);
    assert!(log.contains("served boot script"), "{log}");
    assert!(log.contains("boot beacon"), "{log}");
    if let Firmware::Ovmf = fw {
        assert!(
            log.lines()
                .any(|l| l.contains("tftp transfer complete") && l.contains("ipxe.efi")),
            "OVMF fetched ipxe.efi over TFTP:\n{log}"
        );
    }
    // Which rootfs path the firmware's iPXE took: the wrapped copy only under UEFI.
    let metrics = ns
        .exec(
            "/bin/busybox",
            &["wget", "-q", "-O", "-", &format!("http://{SERVER}/metrics")],
        )
        .expect("read /metrics");
    let wrapped = metrics
        .lines()
        .any(|l| l.contains("route=\"artifact_cpio\",status=\"200\""));
    match fw {
        Firmware::SeaBios => assert!(!wrapped, "BIOS iPXE wraps by itself:\n{metrics}"),
        Firmware::Ovmf => assert!(wrapped, "UEFI iPXE loads our wrapped copy:\n{metrics}"),
    }
    assert!(
        metrics.contains(&format!("tether_pxe_boots_total{{mac=\"{mac}\"}} 1")),
        "{metrics}"
    );
    // Nothing else is left to prove; dropping the VM kills qemu.
    drop(vm);
}

#[test]
fn seabios_pxe_boots_the_image_to_the_agent() {
    pxe_boot(Firmware::SeaBios, "52:54:00:7e:00:01");
}

#[test]
fn ovmf_pxe_boots_the_image_to_the_agent() {
    pxe_boot(Firmware::Ovmf, "52:54:00:7e:00:02");
}
