//! `cargo xtask bench image`: how long `tether-image build` takes (warm; cold with
//! `--cold`, in an empty cache so every package is downloaded and unpacked), how big the
//! artifacts are, and how long qemu (TCG) takes from start to the agent's first log line on
//! the serial console, booting `vmlinux` and `vmlinuz`, with a squashfs and an EROFS rootfs,
//! and `disk.raw` under OVMF through systemd-boot (written from the warm squashfs build).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_image::build::{BuildOptions, build, write_combined_initrd};
use tether_image::disk::{DiskInputs, write_disk};
use tether_image::manifest::{Manifest, keygen};
use tether_image::spec::RootfsFormat;

use crate::error::Error;
use crate::steps::fmt_duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn fail(what: impl std::fmt::Display) -> Error {
    Error::Usage(format!("bench image: {what}"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn agent() -> Result<PathBuf, Error> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let ok = Command::new("cargo")
        .current_dir(workspace())
        .args(["build", "-q", "-p", "tether-agent", "--target-dir"])
        .arg(&target)
        .status()
        .map_err(fail)?
        .success();
    if !ok {
        return Err(fail("cargo build -p tether-agent failed"));
    }
    Ok(target.join("debug/tether-agent"))
}

fn timed_build(opts: &BuildOptions) -> Result<(Duration, Manifest), Error> {
    let start = Instant::now();
    let report = build(opts).map_err(fail)?;
    Ok((start.elapsed(), report.manifest.expect("manifest")))
}

/// Boots the image under qemu TCG; returns the time from spawning qemu to the agent's
/// "tether-agent started" line on the serial console.
fn boot(dir: &Path, kernel: &str, rootfs: &str, cmdline: &str) -> Result<Duration, Error> {
    let initrd = dir.join("bench-initrd.img");
    write_combined_initrd(dir, rootfs, &initrd).map_err(fail)?;
    let serial = dir.join("bench-serial.log");
    let _ = std::fs::remove_file(&serial);
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1536", "-smp", "2"])
        .arg("-kernel")
        .arg(dir.join(kernel))
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(cmdline)
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(fail)?;
    let result = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains("tether-agent started") {
            break Ok(start.elapsed());
        }
        if text.contains("REFUSING TO BOOT") || start.elapsed() > BOOT_TIMEOUT {
            break Err(fail(format!(
                "{kernel} + {rootfs} did not boot; see {}",
                serial.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&initrd);
    result
}

/// Boots `disk.raw` under OVMF (q35, virtio disk); returns the time from spawning qemu to
/// "tether-agent started" (firmware and systemd-boot included).
fn boot_disk(dir: &Path) -> Result<Duration, Error> {
    let vars = dir.join("bench-vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &vars).map_err(fail)?;
    let serial = dir.join("bench-disk-serial.log");
    let _ = std::fs::remove_file(&serial);
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1536", "-smp", "2"])
        .args(["-machine", "q35"])
        .arg("-drive")
        .arg("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd")
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-drive")
        .arg(format!(
            "if=virtio,format=raw,file={}",
            dir.join("disk.raw").display()
        ))
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(fail)?;
    let result = loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        if text.contains("tether-agent started") {
            break Ok(start.elapsed());
        }
        if text.contains("REFUSING TO BOOT") || start.elapsed() > BOOT_TIMEOUT {
            break Err(fail(format!(
                "disk.raw did not boot; see {}",
                serial.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Runs the image benchmark.
pub fn run(cold: bool) -> Result<(), Error> {
    let tmp = std::env::temp_dir().join(format!("tether-bench-image-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(fail)?;
    keygen(&tmp.join("keys")).map_err(fail)?;
    let agent = agent()?;
    let opts = |out: &str, format: RootfsFormat| BuildOptions {
        spec: workspace().join("image-builder/examples/default.toml"),
        out: tmp.join(out),
        agent: Some(agent.clone()),
        key: Some(tmp.join("keys/signing.key")),
        fresh: false,
        format: Some(format),
    };
    println!("| case | figure | value |");
    println!("|---|---|---|");
    if cold {
        let cache = tmp.join("cold-cache");
        // SAFETY: single-threaded here; the builder reads it through Cache::from_env.
        unsafe { std::env::set_var("TETHER_CACHE_DIR", &cache) };
        let (t, _) = timed_build(&opts("cold", RootfsFormat::Squashfs))?;
        unsafe { std::env::remove_var("TETHER_CACHE_DIR") };
        println!(
            "| cold | build (empty cache: download, mmdebstrap, squashfs) | {} |",
            fmt_duration(t)
        );
        let _ = std::fs::remove_dir_all(&cache);
    }
    // The first build fills the caches if needed; the second is the warm figure.
    timed_build(&opts("squashfs", RootfsFormat::Squashfs))?;
    let (t, m) = timed_build(&opts("squashfs", RootfsFormat::Squashfs))?;
    println!("| warm | build, squashfs | {} |", fmt_duration(t));
    let (te, me) = timed_build(&opts("erofs", RootfsFormat::Erofs))?;
    println!("| warm | build, erofs | {} |", fmt_duration(te));
    let size = |m: &Manifest, f: &str| m.artifacts.get(f).map(|a| a.size).unwrap_or(0);
    for f in ["vmlinuz", "vmlinux", "initramfs", "rootfs.squashfs"] {
        println!("| size | {f} | {} |", mb(size(&m, f)));
    }
    println!(
        "| size | rootfs.erofs | {} |",
        mb(size(&me, "rootfs.erofs"))
    );
    let total = size(&m, "vmlinuz") + size(&m, "initramfs") + size(&m, "rootfs.squashfs");
    println!(
        "| size | vmlinuz + initramfs + rootfs.squashfs (goal ≤ 100 MB) | {} |",
        mb(total)
    );
    for (label, dir, rootfs, manifest) in [
        ("squashfs", tmp.join("squashfs"), "rootfs.squashfs", &m),
        ("erofs", tmp.join("erofs"), "rootfs.erofs", &me),
    ] {
        for kernel in ["vmlinux", "vmlinuz"] {
            let t = boot(&dir, kernel, rootfs, &manifest.cmdline)?;
            println!(
                "| boot | qemu TCG start → tether-agent started, {kernel}, {label} | {} |",
                fmt_duration(t)
            );
        }
    }
    let squashfs = tmp.join("squashfs");
    let start = Instant::now();
    write_disk(
        &DiskInputs {
            dir: &squashfs,
            rootfs_file: "rootfs.squashfs",
            version: &m.version,
            extra_cmdline: "console=tty0 console=ttyS0",
            fstype: "squashfs",
            verity: &m.verity,
            epoch: m.source_date_epoch,
        },
        &squashfs.join("disk.raw"),
    )
    .map_err(fail)?;
    println!(
        "| warm | disk.raw from the built artifacts | {} |",
        fmt_duration(start.elapsed())
    );
    let t = boot_disk(&squashfs)?;
    println!(
        "| boot | qemu TCG OVMF → systemd-boot → tether-agent started, disk.raw | {} |",
        fmt_duration(t)
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
