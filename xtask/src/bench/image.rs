//! `cargo xtask bench image`: how long `tether-image build` takes (warm; cold with
//! `--cold`, in an empty cache so every package is downloaded and unpacked), how big the
//! artifacts are, and how long qemu (TCG) takes from start to the agent's first log line on
//! the serial console, booting `vmlinux` and `vmlinuz`, with a squashfs and an EROFS rootfs,
//! and `disk.raw` under OVMF through systemd-boot (written from the warm squashfs build).

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use tether_boot::manifest::Manifest;
use tether_image::build::{BuildOptions, build, write_combined_initrd};
use tether_image::disk::{DiskInputs, write_disk};
use tether_image::keys::keygen;
use tether_image::spec::RootfsFormat;
use tether_testkit::qemu::Qemu;

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
    let ok = crate::steps::cargo()
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
    let mut vm = Qemu::new(&dir.join("bench-serial.log"), 1536)
        .direct_boot(&dir.join(kernel), &initrd, cmdline)
        .args(["-nic", "none"])
        .spawn()?;
    let took = vm.wait_for("tether-agent started", "REFUSING TO BOOT", BOOT_TIMEOUT);
    drop(vm);
    let _ = std::fs::remove_file(&initrd);
    Ok(took?)
}

/// Boots `disk.raw` under OVMF (q35, virtio disk); returns the time from spawning qemu to
/// "tether-agent started" (firmware and systemd-boot included).
fn boot_disk(dir: &Path) -> Result<Duration, Error> {
    let disk = format!(
        "if=virtio,format=raw,file={}",
        dir.join("disk.raw").display()
    );
    let mut vm = Qemu::new(&dir.join("bench-disk-serial.log"), 1536)
        .ovmf(&dir.join("bench-vars.fd"))?
        .args(["-drive", &disk, "-nic", "none"])
        .spawn()?;
    Ok(vm.wait_for("tether-agent started", "REFUSING TO BOOT", BOOT_TIMEOUT)?)
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
