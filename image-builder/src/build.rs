//! `tether-image build`: spec → kernel, initramfs, verified rootfs, signed manifest (and
//! `disk.raw` on request, see [`crate::disk`]).
//!
//! Every step writes into a staging directory next to OUT (`.OUT.partial-PID`), which is
//! renamed to OUT only when all artifacts are written and signed, so a failed or killed
//! build leaves OUT as it was. Expensive inputs are cached by content under
//! `<cache>/image/`: downloaded `.deb`s (shared between builds), the extracted kernel
//! package, and the mmdebstrap base tree (keyed by release + package set + recipe).
//!
//! Reproducibility: SOURCE_DATE_EPOCH (default: the spec file's own fixed default below)
//! is handed to mmdebstrap, every file's mtime in the tree is clamped to it, mksquashfs and
//! mkfs.erofs get it as the fixed time, the cpio initramfs uses it for every entry, and
//! verity's salt and UUID are derived from the file system image, never random.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tether_upstream::{Cache, Pins, debian};

use tether_boot::cmdline::PXE_ROOTFS_PATH;
use tether_boot::manifest::{self, ArtifactDigest, Manifest, Verity};

use crate::boot;
use crate::containers::{self, ContainerImage};
use crate::cpio::{Archive, Entry};
use crate::spec::{RootfsFormat, Spec};
use crate::{Error, Result, disk, kernel, keys};

/// Bump when the base tree recipe changes so cached trees are rebuilt.
const RECIPE: u32 = 5;

/// The SOURCE_DATE_EPOCH used when none is set (2026-01-01T00:00:00Z).
pub const DEFAULT_EPOCH: u64 = 1_767_225_600;

/// Free space the build needs in the cache and next to OUT, MiB.
const NEED_CACHE_MIB: u64 = 2048;
const NEED_OUT_MIB: u64 = 768;
/// Extra space `disk.raw` needs next to OUT (sparse, but its slots are written twice).
const NEED_DISK_MIB: u64 = 512;

/// The initramfs is the one Tether writes, not the distribution's.
const INIT_SCRIPT: &str = include_str!("initramfs/init.sh");

/// Kernel module trees left out of the rootfs: hardware and protocols a Kubernetes server
/// node does not have (sound, GPUs, cameras, input, radios, field buses, embedded buses,
/// exotic file systems). Storage controllers, wired NICs, netfilter, bridges/tunnels,
/// md/dm, and the common file systems stay, so the kubelet and CNI plugins find what they
/// load. A spec that needs more adds a module package; this list keeps the image small.
pub const PRUNED_MODULE_DIRS: &[&str] = &[
    "kernel/sound",
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/staging",
    "kernel/drivers/net/wireless",
    "kernel/drivers/bluetooth",
    "kernel/net/bluetooth",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/drivers/iio",
    "kernel/drivers/isdn",
    "kernel/drivers/comedi",
    "kernel/drivers/input",
    "kernel/drivers/video",
    "kernel/drivers/hid",
    "kernel/drivers/usb/gadget",
    "kernel/drivers/infiniband",
    "kernel/net/sunrpc/xprtrdma",
    "kernel/drivers/net/can",
    "kernel/drivers/net/wwan",
    "kernel/drivers/net/ieee802154",
    "kernel/drivers/net/hamradio",
    "kernel/drivers/net/wan",
    "kernel/drivers/net/arcnet",
    "kernel/drivers/net/fddi",
    "kernel/drivers/mmc",
    "kernel/drivers/mtd",
    "kernel/drivers/leds",
    "kernel/drivers/nfc",
    "kernel/drivers/atm",
    "kernel/drivers/w1",
    "kernel/drivers/ssb",
    "kernel/drivers/bcma",
    "kernel/drivers/memstick",
    "kernel/drivers/pcmcia",
    "kernel/drivers/parport",
    "kernel/drivers/fpga",
    "kernel/drivers/gnss",
    "kernel/drivers/greybus",
    "kernel/drivers/most",
    "kernel/drivers/counter",
    "kernel/drivers/auxdisplay",
    "kernel/drivers/extcon",
    "kernel/drivers/pinctrl",
    "kernel/drivers/soundwire",
    "kernel/drivers/spi",
    "kernel/drivers/power",
    "kernel/drivers/rtc",
    "kernel/drivers/usb/serial",
    "kernel/drivers/usb/misc",
    "kernel/drivers/net/usb",
    "kernel/drivers/thunderbolt",
    "kernel/drivers/platform/chrome",
    "kernel/drivers/platform/surface",
    "kernel/drivers/regulator",
    "kernel/drivers/gpio",
    "kernel/net/nfc",
    "kernel/net/can",
    "kernel/net/ieee802154",
    "kernel/net/6lowpan",
    "kernel/net/atm",
    "kernel/net/rxrpc",
    "kernel/net/mac802154",
    "kernel/fs/ocfs2",
    "kernel/fs/gfs2",
    "kernel/fs/ubifs",
    "kernel/fs/jffs2",
    "kernel/fs/nilfs2",
    "kernel/fs/ntfs3",
    "kernel/fs/hfs",
    "kernel/fs/hfsplus",
    "kernel/fs/ufs",
    "kernel/fs/reiserfs",
    "kernel/fs/jfs",
    "kernel/fs/affs",
    "kernel/fs/befs",
    "kernel/fs/bfs",
    "kernel/fs/efs",
    "kernel/fs/minix",
    "kernel/fs/omfs",
    "kernel/fs/qnx4",
    "kernel/fs/qnx6",
    "kernel/fs/romfs",
    "kernel/fs/sysv",
    "kernel/fs/orangefs",
    "kernel/fs/coda",
    "kernel/fs/dlm",
];

/// Files dpkg never unpacks into the image (dpkg `path-exclude` globs): documentation
/// (licences excepted), translations and shell completions.
pub const EXCLUDED_PATHS: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
    "/usr/share/lintian/*",
    "/usr/share/bash-completion/*",
];

/// Kernel modules every node loads at boot (`modules-load.d`): overlay for containerd's
/// snapshotter, br_netfilter so that traffic between pods on one bridge passes
/// kube-proxy's rules.
pub const NODE_MODULES: &[&str] = &["overlay", "br_netfilter"];

/// The sysctls a Kubernetes node needs (`sysctl.d`): pods' traffic is routed through the
/// node, and bridged pod traffic is seen by iptables (kube-proxy's Service rules). The
/// bridge keys exist only once br_netfilter is loaded: `-` keeps a kernel without it from
/// failing systemd-sysctl.
pub const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("-net.bridge.bridge-nf-call-iptables", "1"),
    ("-net.bridge.bridge-nf-call-ip6tables", "1"),
];

/// Modules the initramfs loads (with their dependencies): loop files, the two rootfs
/// formats, overlay, dm-verity, and the disks a slot can live on.
pub const INITRAMFS_MODULES: &[&str] = &[
    // libcrc32c (erofs, ext4) finds its implementation through a softdep, not modules.dep.
    "crc32c_generic",
    "crc32c-intel",
    "loop",
    "squashfs",
    "erofs",
    "overlay",
    "dm-verity",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "nvme",
    "ext4",
];

/// Busybox applets the init script uses.
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "mkdir",
    "cat",
    "echo",
    "sleep",
    "insmod",
    "losetup",
    "grep",
    "sed",
    "dd",
    "tail",
    "switch_root",
];

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The spec file.
    pub spec: PathBuf,
    /// The output directory (replaced atomically).
    pub out: PathBuf,
    /// Overrides the spec's `agent`.
    pub agent: Option<PathBuf>,
    /// Overrides the spec's `signing_key`.
    pub key: Option<PathBuf>,
    /// Rebuild the mmdebstrap base tree even when cached (downloaded packages are reused).
    pub fresh: bool,
    /// Overrides the spec's rootfs format.
    pub format: Option<RootfsFormat>,
}

/// Timings of a build's steps (what `cargo xtask bench image` reports).
#[derive(Debug, Default, Clone)]
pub struct BuildReport {
    /// (step, seconds).
    pub steps: Vec<(String, f64)>,
    /// The manifest that was written.
    pub manifest: Option<Manifest>,
}

fn progress(report: &mut BuildReport, step: &str, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    tracing::info!("{step}: {secs:.1}s");
    report.steps.push((step.to_string(), secs));
}

/// Runs a build.
pub fn build(opts: &BuildOptions) -> Result<BuildReport> {
    let mut report = BuildReport::default();
    let mut spec = Spec::load(&opts.spec)?;
    if let Some(f) = opts.format {
        spec.rootfs_format = f;
    }
    let agent = opts
        .agent
        .clone()
        .or(spec.agent.clone())
        .ok_or_else(|| Error::SpecInvalid {
            field: "agent".into(),
            reason: "no tether-agent binary: set `agent` in the spec or pass --agent".into(),
        })?;
    let key_path = opts.key.clone().or(spec.signing_key.clone()).ok_or_else(|| Error::SpecInvalid {
        field: "signing_key".into(),
        reason: "no signing key: set `signing_key` in the spec or pass --key (make one with `tether-image keygen`)".into(),
    })?;
    let key = keys::read_signing_key(&key_path)?;
    let agent_bin = fs::read(&agent).map_err(Error::io("read agent", &agent))?;
    if !kernel::is_elf(&agent_bin) {
        return Err(Error::SpecInvalid {
            field: "agent".into(),
            reason: format!("{} is not an ELF executable", agent.display()),
        });
    }
    let units = spec.units.clone().unwrap_or_else(default_units_dir);
    let unit_files = read_units(&units)?;
    let epoch = source_date_epoch()?;
    for tool in [
        "mmdebstrap",
        "veritysetup",
        "zstd",
        "xz",
        "apt-get",
        "dpkg-deb",
        "depmod",
        "chroot",
    ] {
        which(tool)?;
    }
    if spec.disk {
        for tool in ["sgdisk", "mkfs.vfat", "mmd", "mcopy", "mkfs.ext4"] {
            which(tool)?;
        }
        if !Path::new(disk::SYSTEMD_BOOT_EFI).is_file() {
            return Err(Error::MissingTool {
                tool: disk::SYSTEMD_BOOT_EFI.into(),
                hint: "install Debian's systemd-boot-efi (`cargo xtask deps`)".into(),
            });
        }
    }
    which(match spec.rootfs_format {
        RootfsFormat::Squashfs => "mksquashfs",
        RootfsFormat::Erofs => "mkfs.erofs",
    })?;

    let cache = Cache::from_env();
    let cache_dir = cache.root().join("image");
    fs::create_dir_all(&cache_dir).map_err(Error::io("create", &cache_dir))?;
    let out_parent = parent_of(&opts.out);
    fs::create_dir_all(&out_parent).map_err(Error::io("create", &out_parent))?;
    check_space(&cache_dir, NEED_CACHE_MIB)?;
    check_space(
        &out_parent,
        NEED_OUT_MIB + if spec.disk { NEED_DISK_MIB } else { 0 },
    )?;
    check_out(&opts.out)?;

    let release = debian::host_release()?;
    let packages = spec.all_packages();
    let t = Instant::now();
    check_packages(&packages)?;
    progress(&mut report, "check packages", t);

    // Staging for OUT and for the rootfs tree; removed on any error.
    let name = opts
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("out");
    let staging = out_parent.join(format!(".{name}.partial-{}", std::process::id()));
    clean_partials(&out_parent, &format!(".{name}.partial-"));
    let tree = cache_dir.join(format!("work/tree-{}", std::process::id()));
    let containers_work = cache_dir.join(format!("work/containers-{}", std::process::id()));
    let guard = Cleanup(vec![staging.clone(), tree.clone(), containers_work.clone()]);
    fs::create_dir_all(&staging).map_err(Error::io("create", &staging))?;

    let t = Instant::now();
    let kernel_dir = ensure_kernel(&cache_dir)?;
    let kver = kernel_release(&kernel_dir)?;
    progress(&mut report, "kernel package", t);

    let t = Instant::now();
    let base = ensure_base_tree(&cache_dir, &release, &packages, epoch, opts.fresh)?;
    progress(&mut report, "base tree (mmdebstrap)", t);

    let t = Instant::now();
    copy_tree(&base, &tree)?;
    customize_tree(
        &tree,
        &spec.version,
        &agent_bin,
        &unit_files,
        &key,
        &kernel_dir,
        &kver,
    )?;
    progress(&mut report, "customize tree", t);
    let t = Instant::now();
    containers::oci_archive(
        ContainerImage::Pause,
        &Pins::default(),
        &containers_work,
        &tree.join(manifest::PAUSE_ARCHIVE_PATH),
    )?;
    clamp_mtimes(&tree, epoch)?;
    let installed = installed_packages(&tree)?;
    progress(&mut report, "pause image", t);

    let t = Instant::now();
    let rootfs_name = format!("rootfs.{}", spec.rootfs_format.fstype());
    let rootfs = staging.join(&rootfs_name);
    make_filesystem(spec.rootfs_format, &tree, &rootfs, epoch)?;
    progress(&mut report, "rootfs image", t);
    let t = Instant::now();
    let verity = append_verity(&rootfs)?;
    progress(&mut report, "verity", t);

    let t = Instant::now();
    let initramfs = build_initramfs(&tree, &kver, epoch)?;
    write_file(&staging.join("initramfs"), &initramfs)?;
    progress(&mut report, "initramfs", t);

    let t = Instant::now();
    let vmlinuz = kernel_dir.join(format!("boot/vmlinuz-{kver}"));
    fs::copy(&vmlinuz, staging.join("vmlinuz")).map_err(Error::io("copy", &vmlinuz))?;
    let vmlinux = kernel::extract_vmlinux(&vmlinuz)?;
    write_file(&staging.join("vmlinux"), &vmlinux)?;
    progress(&mut report, "kernel", t);

    let cmdline = boot::pxe_cmdline(&spec.cmdline, spec.rootfs_format.fstype(), &verity)?;
    let mut files = vec!["vmlinuz", "vmlinux", "initramfs", rootfs_name.as_str()];
    if spec.disk {
        let t = Instant::now();
        disk::write_disk(
            &disk::DiskInputs {
                dir: &staging,
                rootfs_file: &rootfs_name,
                version: &spec.version,
                extra_cmdline: &spec.cmdline,
                fstype: spec.rootfs_format.fstype(),
                verity: &verity,
                epoch,
            },
            &staging.join("disk.raw"),
        )?;
        files.push("disk.raw");
        progress(&mut report, "disk.raw", t);
    }
    let mut artifacts = BTreeMap::new();
    for file in files {
        let path = staging.join(file);
        artifacts.insert(file.to_string(), digest(&path)?);
    }
    let manifest = Manifest {
        version: spec.version.clone(),
        kernel_release: kver.clone(),
        rootfs_format: spec.rootfs_format.fstype().into(),
        cmdline,
        verity,
        artifacts,
        packages: installed,
        source_date_epoch: epoch,
    };
    let bytes = manifest.render();
    let signature = manifest::sign(&key, &bytes);
    write_file(&staging.join("manifest.json"), &bytes)?;
    write_file(
        &staging.join("manifest.sig"),
        format!("{signature}\n").as_bytes(),
    )?;
    write_file(
        &staging.join("bootimage.yaml"),
        boot::bootimage_yaml(&manifest, &signature, &spec.url_base).as_bytes(),
    )?;

    publish(&staging, &opts.out)?;
    drop(guard);
    report.manifest = Some(manifest);
    Ok(report)
}

/// The repository's `systemd/` directory (next to this crate).
pub fn default_units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn read_units(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).map_err(Error::io("read units", dir))? {
        let e = e.map_err(Error::io("read units", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if [
            ".service", ".network", ".target", ".socket", ".timer", ".conf",
        ]
        .iter()
        .any(|s| name.ends_with(s))
        {
            out.insert(
                name,
                fs::read(e.path()).map_err(Error::io("read", e.path()))?,
            );
        }
    }
    if !out.contains_key("tether-agent.service") {
        return Err(Error::SpecInvalid {
            field: "units".into(),
            reason: format!("{} has no tether-agent.service", dir.display()),
        });
    }
    Ok(out)
}

/// SOURCE_DATE_EPOCH from the environment, else [`DEFAULT_EPOCH`].
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse().map_err(|_| Error::SpecInvalid {
            field: "SOURCE_DATE_EPOCH".into(),
            reason: format!("{v:?} is not a number of seconds"),
        }),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// OUT may be absent, empty, or a previous image (it has a manifest.json); anything else is
/// somebody's directory and is not replaced.
fn check_out(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let empty = fs::read_dir(out)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if out.is_dir() && (empty || out.join("manifest.json").is_file()) {
        return Ok(());
    }
    Err(Error::SpecInvalid {
        field: "-o".into(),
        reason: format!(
            "{} exists and is not an image directory; not replacing it",
            out.display()
        ),
    })
}

/// Replaces OUT by the staging directory: the old OUT stays whole until the new one is in
/// place under its name.
fn publish(staging: &Path, out: &Path) -> Result<()> {
    for f in fs::read_dir(staging)
        .map_err(Error::io("read", staging))?
        .flatten()
    {
        let _ = fs::File::open(f.path()).and_then(|f| f.sync_all());
    }
    if out.exists() {
        let old = parent_of(out).join(format!(
            ".{}.old-{}",
            out.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
            std::process::id()
        ));
        fs::rename(out, &old).map_err(Error::io("rename", out))?;
        fs::rename(staging, out).map_err(Error::io("rename", staging))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(staging, out).map_err(Error::io("rename", staging))?;
    }
    Ok(())
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn clean_partials(dir: &Path, prefix: &str) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Free MiB in the file system holding `dir`.
pub fn free_mib(dir: &Path) -> Result<u64> {
    let out = run(Command::new("df").args(["--output=avail", "-BM"]).arg(dir))?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().trim_end_matches('M').parse().ok())
        .ok_or_else(|| Error::Command {
            command: format!("df {}", dir.display()),
            detail: format!("unexpected output {out:?}"),
        })
}

fn check_space(dir: &Path, needed: u64) -> Result<()> {
    let available = free_mib(dir)?;
    if available < needed {
        return Err(Error::NoSpace {
            path: dir.to_path_buf(),
            available,
            needed,
        });
    }
    Ok(())
}

fn which(tool: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingTool {
            tool: tool.into(),
            hint:
                "run `cargo xtask deps` (it installs the Debian packages in upstream/src/debian.rs)"
                    .into(),
        })
}

/// Runs a command, returning stdout; a failure carries the tail of stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("run", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(Error::Command {
            command: format!(
                "{} {}",
                cmd.get_program().to_string_lossy(),
                cmd.get_args()
                    .take(6)
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            detail: format!(
                "{}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every package must be known to the host's apt (same release and sources as the build):
/// a typo fails here in a second, not after minutes of mmdebstrap.
fn check_packages(packages: &[String]) -> Result<()> {
    for p in packages {
        let out = Command::new("apt-cache")
            .args(["show", "--no-all-versions", p])
            .stdin(Stdio::null())
            .output()
            .map_err(Error::io("run", "apt-cache"))?;
        if !out.status.success() || out.stdout.is_empty() {
            return Err(Error::MissingPackage {
                package: p.clone(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn digest(path: &Path) -> Result<ArtifactDigest> {
    use std::io::Read;
    let mut f = fs::File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok(ArtifactDigest {
        size,
        sha256: hex::encode(h.finalize()),
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(Error::io("create", path))?;
    f.write_all(data).map_err(Error::io("write", path))?;
    f.sync_all().map_err(Error::io("sync", path))
}

/// Downloads Debian's current `linux-image-amd64` kernel package (cached by file name) and
/// extracts it once. Returns the extracted tree.
fn ensure_kernel(cache_dir: &Path) -> Result<PathBuf> {
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .ok_or_else(|| Error::MissingPackage {
            package: "linux-image-amd64".into(),
            detail: "it depends on no linux-image-*-amd64".into(),
        })?
        .to_string();
    let debs = cache_dir.join("debs");
    fs::create_dir_all(&debs).map_err(Error::io("create", &debs))?;
    let find = || {
        fs::read_dir(&debs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    let deb = match find() {
        Some(d) => d,
        None => {
            tracing::info!("downloading {pkg}");
            let dl = cache_dir.join(format!("work/dl-{}", std::process::id()));
            fs::create_dir_all(&dl).map_err(Error::io("create", &dl))?;
            let r = run(Command::new("apt-get")
                .args(["download", "-q", &pkg])
                .current_dir(&dl));
            if let Err(e) = r {
                let _ = fs::remove_dir_all(&dl);
                return Err(e);
            }
            for e in fs::read_dir(&dl).map_err(Error::io("read", &dl))?.flatten() {
                fs::rename(e.path(), debs.join(e.file_name()))
                    .map_err(Error::io("move", e.path()))?;
            }
            let _ = fs::remove_dir_all(&dl);
            find().ok_or_else(|| Error::MissingPackage {
                package: pkg.clone(),
                detail: "apt-get download produced no .deb".into(),
            })?
        }
    };
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("kernel")
        .to_string();
    let dest = cache_dir.join("kernel").join(&stem);
    if dest.join("boot").is_dir() {
        return Ok(dest);
    }
    let tmp = cache_dir
        .join("kernel")
        .join(format!(".{stem}.partial-{}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(Error::io("create", &tmp))?;
    if let Err(e) = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp)) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &dest).map_err(Error::io("rename", &dest))?;
    Ok(dest)
}

/// The kernel release (`6.1.0-28-amd64`) of an extracted kernel package.
fn kernel_release(kernel_dir: &Path) -> Result<String> {
    let boot = kernel_dir.join("boot");
    fs::read_dir(&boot)
        .map_err(Error::io("read", &boot))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(String::from)
        })
        .next()
        .ok_or_else(|| Error::Kernel {
            path: boot,
            reason: "no vmlinuz-* in the kernel package".into(),
        })
}

/// The cached mmdebstrap tree for this package set.
fn ensure_base_tree(
    cache_dir: &Path,
    release: &str,
    packages: &[String],
    epoch: u64,
    fresh: bool,
) -> Result<PathBuf> {
    let key = {
        let mut h = Sha256::new();
        h.update(format!(
            "{RECIPE}\n{release}\n{epoch}\n{}",
            packages.join(",")
        ));
        hex::encode(&h.finalize()[..8])
    };
    let base_dir = cache_dir.join("base");
    let dest = base_dir.join(&key);
    let cache = Cache::from_env();
    let _lock = cache.lock("image-base").map_err(Error::Upstream)?;
    if dest.join("usr/lib/systemd/systemd").exists() && !fresh {
        return Ok(dest);
    }
    fs::create_dir_all(&base_dir).map_err(Error::io("create", &base_dir))?;
    clean_partials(&base_dir, &format!(".{key}.partial-"));
    let staging = base_dir.join(format!(".{key}.partial-{}", std::process::id()));
    let debs = cache_dir.join("debs");
    fs::create_dir_all(&debs).map_err(Error::io("create", &debs))?;
    // mmdebstrap installs the file under its own name: keep that name constant.
    let sources_dir = base_dir.join(format!(".sources-{}", std::process::id()));
    fs::create_dir_all(&sources_dir).map_err(Error::io("create", &sources_dir))?;
    let sources = sources_dir.join("debian.sources");
    fs::write(&sources, debian::host_sources(release)?).map_err(Error::io("write", &sources))?;
    tracing::info!(
        "mmdebstrap {release}: {} packages (minutes when cold)",
        packages.len()
    );
    let result = run(Command::new("mmdebstrap")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .arg("--variant=minbase")
        .arg("--mode=root")
        .arg("--quiet")
        .arg(format!("--include={}", packages.join(",")))
        // debootstrap's merged /usr, without the usrmerge package (which drags in perl).
        .arg("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr")
        .args(
            EXCLUDED_PATHS
                .iter()
                .map(|p| format!("--dpkgopt=path-exclude={p}")),
        )
        .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        // Downloaded packages are kept between builds: copied in before apt runs, copied
        // back out after, then removed from the tree.
        .arg("--skip=essential/unlink")
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            debs.display()
        ))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            debs.display()
        ))
        .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb")
        .arg(release)
        .arg(&staging)
        .arg(&sources));
    let _ = fs::remove_dir_all(&sources_dir);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(Error::io("remove", &dest))?;
    }
    fs::rename(&staging, &dest).map_err(Error::io("rename", &dest))?;
    Ok(dest)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        fs::remove_dir_all(to).map_err(Error::io("remove", to))?;
    }
    if let Some(p) = to.parent() {
        fs::create_dir_all(p).map_err(Error::io("create", p))?;
    }
    run(Command::new("cp").arg("-a").arg(from).arg(to)).map(|_| ())
}

/// Turns the Debian tree into a Tether node: agent, units, trusted key, kernel modules,
/// and nothing that makes one boot differ from another or needs apt at run time.
fn customize_tree(
    tree: &Path,
    version: &str,
    agent: &[u8],
    units: &BTreeMap<String, Vec<u8>>,
    key: &ed25519_dalek::SigningKey,
    kernel_dir: &Path,
    kver: &str,
) -> Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let p = |rel: &str| tree.join(rel);
    let agent_path = p("usr/bin/tether-agent");
    write_file(&agent_path, agent)?;
    fs::set_permissions(&agent_path, fs::Permissions::from_mode(0o755))
        .map_err(Error::io("chmod", &agent_path))?;

    let unit_dir = p("usr/lib/systemd/system");
    let network_dir = p("usr/lib/systemd/network");
    fs::create_dir_all(&network_dir).map_err(Error::io("create", &network_dir))?;
    for (name, body) in units {
        let dir = if name.ends_with(".network") {
            &network_dir
        } else {
            &unit_dir
        };
        write_file(&dir.join(name), body)?;
    }
    let wants = p("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).map_err(Error::io("create", &wants))?;
    let mut enable = vec![
        "tether-agent.service".to_string(),
        "systemd-resolved.service".to_string(),
    ];
    // The rootfs is read-only: /tmp is a tmpfs (Debian ships the unit, unenabled), or every
    // unit with PrivateTmp/PrivateDevices fails to set up its namespace.
    let local_fs = p("etc/systemd/system/local-fs.target.wants");
    fs::create_dir_all(&local_fs).map_err(Error::io("create", &local_fs))?;
    for link in [
        p("etc/systemd/system/tmp.mount"),
        local_fs.join("tmp.mount"),
    ] {
        let _ = fs::remove_file(&link);
        symlink("/usr/share/systemd/tmp.mount", &link).map_err(Error::io("link", &link))?;
    }
    let sysinit = p("etc/systemd/system/sysinit.target.wants");
    fs::create_dir_all(&sysinit).map_err(Error::io("create", &sysinit))?;
    let timesyncd = sysinit.join("systemd-timesyncd.service");
    let _ = fs::remove_file(&timesyncd);
    symlink(
        "/usr/lib/systemd/system/systemd-timesyncd.service",
        &timesyncd,
    )
    .map_err(Error::io("link", &timesyncd))?;
    if units.keys().any(|n| n.ends_with(".network")) {
        enable.push("systemd-networkd.service".into());
    }
    for unit in enable {
        let link = wants.join(&unit);
        let _ = fs::remove_file(&link);
        symlink(format!("/usr/lib/systemd/system/{unit}"), &link)
            .map_err(Error::io("link", &link))?;
    }
    // No interactive first-boot questions on a node, and no package manager jobs: its
    // software changes only by image.
    for unit in [
        "systemd-firstboot.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "apt-daily.service",
        "apt-daily-upgrade.service",
        "dpkg-db-backup.timer",
        "dpkg-db-backup.service",
    ] {
        let link = p(&format!("etc/systemd/system/{unit}"));
        let _ = fs::remove_file(&link);
        symlink("/dev/null", &link).map_err(Error::io("mask", &link))?;
    }
    // An empty machine-id: systemd makes a fresh one on every boot (first-boot semantics
    // without the firstboot service).
    write_file(&p("etc/machine-id"), b"")?;
    let _ = fs::remove_file(p("var/lib/dbus/machine-id"));
    let hostname = p("etc/hostname");
    write_file(&hostname, b"tether\n")?;
    write_node_contract(tree)?;

    let pubkey_path = p(manifest::PUBLIC_KEY_PATH);
    fs::create_dir_all(pubkey_path.parent().expect("has parent"))
        .map_err(Error::io("create", &pubkey_path))?;
    let public = manifest::public_key_text(key);
    write_file(&pubkey_path, format!("{public}\n").as_bytes())?;
    // What the agent reports as the image it runs.
    write_file(
        &p(manifest::IMAGE_VERSION_PATH),
        format!("{version}\n").as_bytes(),
    )?;

    // Run-time state that must not be baked in: apt's indexes and caches, logs, backups.
    for rel in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/cache/debconf/config.dat-old",
        "var/cache/debconf/templates.dat-old",
        "var/lib/dpkg/status-old",
        "var/lib/dpkg/diversions-old",
        "var/cache/ldconfig/aux-cache",
        "var/log",
        "etc/ssh",
    ] {
        let path = p(rel);
        if path.is_dir() {
            fs::remove_dir_all(&path).map_err(Error::io("remove", &path))?;
            fs::create_dir_all(&path).map_err(Error::io("create", &path))?;
        } else {
            let _ = fs::remove_file(&path);
        }
    }
    let _ = fs::remove_dir(p("etc/ssh"));
    for rel in [
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/log/journal",
    ] {
        fs::create_dir_all(p(rel)).map_err(Error::io("create", p(rel)))?;
    }

    // Kernel modules, pruned to what a server node can use.
    let src = kernel_dir.join("lib/modules").join(kver);
    let dst = p("usr/lib/modules").join(kver);
    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(Error::io("remove", &dst))?;
    }
    fs::create_dir_all(p("usr/lib/modules")).map_err(Error::io("create", "usr/lib/modules"))?;
    run(Command::new("cp").arg("-a").arg(&src).arg(&dst))?;
    for dir in PRUNED_MODULE_DIRS {
        let d = dst.join(dir);
        if d.exists() {
            fs::remove_dir_all(&d).map_err(Error::io("remove", &d))?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(tree).arg(kver))?;
    Ok(())
}

/// What makes the tree a Kubernetes node before anything is installed on it: the modules
/// and sysctls the kubelet, kube-proxy and CNI expect, and a real `/etc/resolv.conf`
/// (systemd-resolved's list of the DHCP-given servers, which the kubelet hands to pods with
/// `dnsPolicy: Default`, CoreDNS among them).
fn write_node_contract(tree: &Path) -> Result<()> {
    use std::os::unix::fs::symlink;
    for dir in ["usr/lib/modules-load.d", "usr/lib/sysctl.d"] {
        fs::create_dir_all(tree.join(dir)).map_err(Error::io("create", tree.join(dir)))?;
    }
    let modules: String = NODE_MODULES.iter().map(|m| format!("{m}\n")).collect();
    write_file(
        &tree.join("usr/lib/modules-load.d/tether-node.conf"),
        modules.as_bytes(),
    )?;
    let sysctls: String = NODE_SYSCTLS
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    write_file(
        &tree.join("usr/lib/sysctl.d/90-tether-node.conf"),
        sysctls.as_bytes(),
    )?;
    let resolv = tree.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    symlink("/run/systemd/resolve/resolv.conf", &resolv).map_err(Error::io("link", &resolv))?;
    Ok(())
}

/// Sets every mtime in the tree to `epoch` (files written after mmdebstrap, and the
/// directories they changed, would otherwise carry the build time).
fn clamp_mtimes(tree: &Path, epoch: u64) -> Result<()> {
    run(Command::new("find").arg(tree).args([
        "-newermt",
        &format!("@{epoch}"),
        "-exec",
        "touch",
        "--no-dereference",
        "--date",
        &format!("@{epoch}"),
        "{}",
        "+",
    ]))
    .map(|_| ())
}

/// Installed packages and versions, from the tree's dpkg database.
fn installed_packages(tree: &Path) -> Result<BTreeMap<String, String>> {
    let out = run(Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            tree.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Package} ${Version}\n"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect())
}

fn make_filesystem(format: RootfsFormat, tree: &Path, out: &Path, epoch: u64) -> Result<()> {
    let e = epoch.to_string();
    match format {
        RootfsFormat::Squashfs => run(Command::new("mksquashfs")
            .arg(tree)
            .arg(out)
            .args([
                "-noappend",
                "-no-progress",
                "-quiet",
                "-no-xattrs",
                "-comp",
                "zstd",
                "-b",
                "1M",
            ])
            .args(["-mkfs-time", &e, "-all-time", &e])),
        RootfsFormat::Erofs => run(Command::new("mkfs.erofs")
            .args(["-zlz4hc,12", "-x-1", "--quiet"])
            .arg(format!("-T{e}"))
            .arg(format!("-U{}", uuid_from(&sha256_hex(e.as_bytes()))))
            .arg(out)
            .arg(tree)),
    }
    .map(|_| ())?;
    // dm-verity works on 4 KiB blocks.
    let len = fs::metadata(out).map_err(Error::io("stat", out))?.len();
    let padded = len.div_ceil(4096) * 4096;
    fs::OpenOptions::new()
        .write(true)
        .open(out)
        .and_then(|f| f.set_len(padded))
        .map_err(Error::io("pad", out))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` from the first 32 hex digits.
pub fn uuid_from(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Appends the dm-verity hash tree (with superblock) to the image and returns its
/// parameters. Salt and UUID come from the image's own hash: reproducible, yet distinct
/// per image.
fn append_verity(image: &Path) -> Result<Verity> {
    let fs_digest = digest(image)?;
    let hash_offset = fs_digest.size;
    let salt = fs_digest.sha256.clone();
    let out = run(Command::new("veritysetup")
        .arg("format")
        .arg(image)
        .arg(image)
        .arg(format!("--hash-offset={hash_offset}"))
        .arg(format!("--data-blocks={}", hash_offset / 4096))
        .arg(format!("--salt={salt}"))
        .arg(format!("--uuid={}", uuid_from(&salt)))
        .arg("--hash=sha256"))?;
    let root_hash = parse_root_hash(&out).ok_or_else(|| Error::Command {
        command: "veritysetup format".into(),
        detail: format!("no root hash in its output: {out}"),
    })?;
    Ok(Verity {
        root_hash,
        hash_offset,
        salt,
        algorithm: "sha256".into(),
    })
}

/// The `Root hash:` line of `veritysetup format`.
pub fn parse_root_hash(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The load order of `wanted` modules and their dependencies from a `modules.dep` text:
/// dependencies first, each module once. Unknown names are skipped (built into the kernel).
pub fn module_load_order(modules_dep: &str, wanted: &[&str]) -> Vec<String> {
    let norm = |s: &str| s.replace('-', "_");
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| norm(n.split(".ko").next().unwrap_or(n)))
            .unwrap_or_default();
        deps.insert(
            name,
            (
                path.to_string(),
                rest.split_whitespace().map(String::from).collect(),
            ),
        );
    }
    let by_path: BTreeMap<&str, &str> = deps
        .iter()
        .map(|(n, (p, _))| (p.as_str(), n.as_str()))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        by_path: &BTreeMap<&str, &str>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((path, ds)) = deps.get(name) else {
            return;
        };
        for d in ds {
            if let Some(dn) = by_path.get(d.as_str()) {
                visit(dn, deps, by_path, seen, order);
            }
        }
        order.push(path.clone());
    }
    for w in wanted {
        visit(&norm(w), &deps, &by_path, &mut seen, &mut order);
    }
    order
}

/// Files a binary in `tree` needs at run time (itself, its libraries, the loader), found
/// with the tree's own `ldd`.
fn library_closure(tree: &Path, binary: &str) -> Result<Vec<String>> {
    let out = run(Command::new("chroot")
        .arg(tree)
        .args(["/usr/bin/ldd", binary]))?;
    let mut files = vec![binary.to_string()];
    for line in out.lines() {
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(p.to_string());
        }
    }
    Ok(files)
}

/// The initramfs: busybox, veritysetup and its libraries (from the image's own packages),
/// the modules in load order, and our init; a sorted cpio compressed with zstd.
fn build_initramfs(tree: &Path, kver: &str, epoch: u64) -> Result<Vec<u8>> {
    let mut a = Archive::new();
    let read = |rel: &str| -> Result<Vec<u8>> {
        let path = tree.join(rel.trim_start_matches('/'));
        // Follow symlinks inside the tree (usrmerge: /lib -> usr/lib).
        let real = resolve_in_tree(tree, &path)?;
        fs::read(&real).map_err(Error::io("read", &real))
    };
    for dir in ["dev", "proc", "sys", "run", "tmp", "sysroot", "etc"] {
        a.add(dir, Entry::Dir(0o755));
    }
    a.add("dev/console", Entry::CharDev(0o600, 5, 1));
    a.add("init", Entry::File(0o755, INIT_SCRIPT.as_bytes().to_vec()));
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .find(|p| tree.join(p).exists())
        .ok_or_else(|| Error::MissingPackage {
            package: "busybox-static".into(),
            detail: "the initramfs needs it in the image's package set".into(),
        })?;
    a.add("bin/busybox", Entry::File(0o755, read(busybox)?));
    for applet in APPLETS {
        a.add(&format!("bin/{applet}"), Entry::Symlink("busybox".into()));
    }
    for file in library_closure(tree, "/usr/sbin/veritysetup")? {
        let name = Path::new(&file)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let dest = if file.ends_with("veritysetup") {
            "bin/veritysetup".to_string()
        } else {
            format!("lib/{name}")
        };
        a.add(&dest, Entry::File(0o755, read(&file)?));
    }
    a.add("lib64", Entry::Symlink("lib".into()));
    a.add("etc/ld.so.conf", Entry::File(0o644, b"/lib\n".to_vec()));
    a.add("usr", Entry::Dir(0o755));
    a.add("usr/lib", Entry::Symlink("../lib".into()));
    // The tree's copy: depmod ran there (the package ships no modules.dep).
    let mod_dir = tree.join("usr/lib/modules").join(kver);
    let dep_path = mod_dir.join("modules.dep");
    let dep = fs::read_to_string(&dep_path).map_err(Error::io("read", &dep_path))?;
    let order = module_load_order(&dep, INITRAMFS_MODULES);
    for m in &order {
        let path = mod_dir.join(m);
        a.add(
            &format!("lib/modules/{m}"),
            Entry::File(0o644, fs::read(&path).map_err(Error::io("read", &path))?),
        );
    }
    a.add(
        "etc/initramfs-modules",
        Entry::File(0o644, format!("{}\n", order.join("\n")).into_bytes()),
    );
    let cpio = a.write(epoch as u32);
    let mut child = Command::new("zstd")
        .args(["-19", "-q", "-c", "-T1", "--no-check"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(Error::io("run", "zstd"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(&cpio));
    let out = child.wait_with_output().map_err(Error::io("run", "zstd"))?;
    writer
        .join()
        .expect("writer thread")
        .map_err(Error::io("write", "zstd"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: "zstd -19".into(),
            detail: out.status.to_string(),
        });
    }
    let mut data = out.stdout;
    // A following (concatenated) archive must start 4-aligned.
    while !data.len().is_multiple_of(4) {
        data.push(0);
    }
    Ok(data)
}

/// Resolves symlinks of `path` as if `tree` were `/`.
fn resolve_in_tree(tree: &Path, path: &Path) -> Result<PathBuf> {
    let rel = path.strip_prefix(tree).unwrap_or(path);
    let mut cur = tree.to_path_buf();
    let mut parts: Vec<std::ffi::OsString> = rel.iter().map(|c| c.to_os_string()).collect();
    parts.reverse();
    let mut hops = 0;
    while let Some(part) = parts.pop() {
        if part == "/" || part == "." {
            continue;
        }
        if part == ".." {
            if cur != tree {
                cur.pop();
            }
            continue;
        }
        let next = cur.join(&part);
        match fs::read_link(&next) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return Err(Error::Io {
                        action: "resolve",
                        path: path.to_path_buf(),
                        source: std::io::Error::other("too many symlinks"),
                    });
                }
                if target.is_absolute() {
                    cur = tree.to_path_buf();
                }
                let mut t: Vec<std::ffi::OsString> =
                    target.iter().map(|c| c.to_os_string()).collect();
                t.reverse();
                parts.extend(t);
            }
            Err(_) => cur = next,
        }
    }
    Ok(cur)
}

/// Writes a single initrd for qemu's `-initrd` (which takes one file): the initramfs
/// followed by a cpio holding the rootfs at [`PXE_ROOTFS_PATH`] — the same bytes the kernel
/// sees when iPXE loads the two as separate initrds.
pub fn write_combined_initrd(image_dir: &Path, rootfs_file: &str, out: &Path) -> Result<()> {
    let initramfs = image_dir.join("initramfs");
    let rootfs = image_dir.join(rootfs_file);
    let mut f = fs::File::create(out).map_err(Error::io("create", out))?;
    let mut src = fs::File::open(&initramfs).map_err(Error::io("open", &initramfs))?;
    std::io::copy(&mut src, &mut f).map_err(Error::io("copy", &initramfs))?;
    let size = fs::metadata(&rootfs)
        .map_err(Error::io("stat", &rootfs))?
        .len();
    let header = tether_boot::initrd::entry_header(PXE_ROOTFS_PATH, size).map_err(|e| {
        Error::SpecInvalid {
            field: "rootfs".into(),
            reason: e.to_string(),
        }
    })?;
    f.write_all(&header).map_err(Error::io("write", out))?;
    let mut src = fs::File::open(&rootfs).map_err(Error::io("open", &rootfs))?;
    std::io::copy(&mut src, &mut f).map_err(Error::io("copy", &rootfs))?;
    f.write_all(&tether_boot::initrd::entry_trailer(size))
        .map_err(Error::io("write", out))?;
    Ok(())
}

/// Checks an image directory: the signature over manifest.json with `public`, and every
/// artifact's size and sha256.
pub fn verify_image(dir: &Path, public: &ed25519_dalek::VerifyingKey) -> Result<Manifest> {
    let mpath = dir.join("manifest.json");
    let bytes = fs::read(&mpath).map_err(Error::io("read", &mpath))?;
    let spath = dir.join("manifest.sig");
    let sig = fs::read_to_string(&spath).map_err(Error::io("read", &spath))?;
    manifest::verify(public, &bytes, &sig).map_err(|e| Error::Verify(e.to_string()))?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::Verify(format!("manifest.json: {e}")))?;
    for (file, want) in &m.artifacts {
        let got = digest(&dir.join(file))?;
        if &got != want {
            return Err(Error::Verify(format!(
                "{file}: size {} sha256 {} but the manifest says size {} sha256 {}",
                got.size, got.sha256, want.size, want.sha256
            )));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_puts_dependencies_first() {
        let dep = "kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/lib/reed_solomon/reed_solomon.ko kernel/drivers/md/dm-mod.ko\nkernel/drivers/md/dm-bufio.ko:\nkernel/drivers/md/dm-mod.ko:\nkernel/lib/reed_solomon/reed_solomon.ko:\nkernel/fs/overlayfs/overlay.ko:\nkernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio.ko:\n";
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["dm-verity", "overlay"],
                &[
                    "kernel/drivers/md/dm-bufio.ko",
                    "kernel/lib/reed_solomon/reed_solomon.ko",
                    "kernel/drivers/md/dm-mod.ko",
                    "kernel/drivers/md/dm-verity.ko",
                    "kernel/fs/overlayfs/overlay.ko",
                ],
            ),
            (
                &["dm_mod", "dm-verity"],
                &[
                    "kernel/drivers/md/dm-mod.ko",
                    "kernel/drivers/md/dm-bufio.ko",
                    "kernel/lib/reed_solomon/reed_solomon.ko",
                    "kernel/drivers/md/dm-verity.ko",
                ],
            ),
            (
                &["builtin_thing", "virtio_blk"],
                &[
                    "kernel/drivers/virtio/virtio.ko",
                    "kernel/drivers/block/virtio_blk.ko",
                ],
            ),
        ];
        for (wanted, want) in cases {
            assert_eq!(module_load_order(dep, wanted), *want, "{wanted:?}");
        }
    }

    #[test]
    fn root_hash_and_uuid() {
        let out = "VERITY header information for x\nUUID:            \t1\nRoot hash:      \t4a5b\n";
        assert_eq!(parse_root_hash(out).as_deref(), Some("4a5b"));
        assert_eq!(parse_root_hash("Root hash: zz\n"), None);
        assert_eq!(parse_root_hash("nothing"), None);
        assert_eq!(
            uuid_from(&"0123456789abcdef".repeat(4)),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
    }

    #[test]
    fn resolves_symlinks_inside_the_tree() {
        use std::os::unix::fs::symlink;
        let t = tempfile::tempdir().unwrap();
        let tree = t.path();
        fs::create_dir_all(tree.join("usr/lib/x86_64-linux-gnu")).unwrap();
        fs::write(tree.join("usr/lib/x86_64-linux-gnu/libc.so.6.real"), b"c").unwrap();
        symlink("usr/lib", tree.join("lib")).unwrap();
        symlink(
            "libc.so.6.real",
            tree.join("usr/lib/x86_64-linux-gnu/libc.so.6"),
        )
        .unwrap();
        symlink("/usr/lib/x86_64-linux-gnu/libc.so.6", tree.join("abs")).unwrap();
        for p in ["lib/x86_64-linux-gnu/libc.so.6", "abs"] {
            assert_eq!(
                resolve_in_tree(tree, &tree.join(p)).unwrap(),
                tree.join("usr/lib/x86_64-linux-gnu/libc.so.6.real"),
                "{p}"
            );
        }
        symlink("loop", tree.join("loop")).unwrap();
        assert!(resolve_in_tree(tree, &tree.join("loop")).is_err());
    }

    #[test]
    fn out_must_be_an_image_dir() {
        let t = tempfile::tempdir().unwrap();
        assert!(check_out(&t.path().join("new")).is_ok());
        assert!(check_out(t.path()).is_ok(), "empty dir");
        fs::write(t.path().join("precious.txt"), b"x").unwrap();
        let err = check_out(t.path()).unwrap_err().to_string();
        assert!(err.contains("not an image directory"), "{err}");
        fs::write(t.path().join("manifest.json"), b"{}").unwrap();
        assert!(check_out(t.path()).is_ok());
    }

    #[test]
    fn publish_replaces_whole() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("old"), b"1").unwrap();
        let staging = t.path().join(".out.partial-1");
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("new"), b"2").unwrap();
        publish(&staging, &out).unwrap();
        assert!(out.join("new").exists() && !out.join("old").exists());
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1, "no leftovers");
    }
}
