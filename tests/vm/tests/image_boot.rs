//! Acceptance tests of `tether-image` (issue #5): a real build of the example spec, booted
//! for real — the rootfs under systemd-nspawn, the whole image (vmlinux + initramfs +
//! rootfs as a second initrd) under qemu with TCG — plus the verification failure path and
//! byte-for-byte reproducibility. Builds share one image per test run (and the builder's
//! own caches across runs); each qemu boot is bounded by [`BOOT_TIMEOUT`].

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_image::build::{BuildOptions, build, verify_image, write_combined_initrd};
use tether_image::keys;
use tether_image::{Error, spec::RootfsFormat};
use tether_testkit::Container;
use tether_testkit::nspawn::ContainerOptions;
use tether_testkit::qemu::{self, Qemu};
use tether_vm_tests::image::{Built, agent_binary, image, options, scratch, workspace};

/// How long a TCG boot may take to reach the agent (about 20 s of guest time here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// A qemu VM (testkit's, killed on drop) whose waits panic with the console's tail.
struct Vm(qemu::Vm);

impl Vm {
    /// Boots `kernel` with the image's initramfs + `rootfs` as one initrd.
    fn boot(image: &Built, kernel: &str, rootfs: &Path, tag: &str) -> Vm {
        let work = image.dir.parent().unwrap().join(format!("vm-{tag}"));
        fs::create_dir_all(&work).unwrap();
        let rootfs_name = "rootfs.squashfs";
        // Stage the (possibly tampered) rootfs next to the initramfs.
        let stage = work.join("stage");
        fs::create_dir_all(&stage).unwrap();
        fs::copy(image.dir.join("initramfs"), stage.join("initramfs")).unwrap();
        fs::copy(rootfs, stage.join(rootfs_name)).unwrap();
        let initrd = work.join("initrd.img");
        write_combined_initrd(&stage, rootfs_name, &initrd).unwrap();
        fs::remove_dir_all(&stage).unwrap();
        let vm = Qemu::new(&work.join("serial.log"), 1536)
            .direct_boot(&image.dir.join(kernel), &initrd, &image.manifest.cmdline)
            .args(["-nic", "none"])
            .spawn()
            .expect("start qemu");
        Vm(vm)
    }

    fn console(&self) -> String {
        self.0.console()
    }

    /// Waits until the console shows `want`; fails early on `refuse`. Returns the time
    /// since qemu was spawned.
    fn wait_for(&mut self, want: &str, refuse: &str) -> Duration {
        self.0
            .wait_for(want, refuse, BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn tail(text: &str) -> String {
    qemu::tail(text, 40)
}

#[test]
fn image_is_signed_and_complete() {
    let image = image();
    let public = keys::read_public_key(&image.key).unwrap();
    let m = verify_image(&image.dir, &public).expect("signature and digests verify");
    for file in ["vmlinuz", "vmlinux", "initramfs", "rootfs.squashfs"] {
        assert!(m.artifacts.contains_key(file), "{file} in manifest");
    }
    assert!(m.packages.contains_key("systemd") && m.packages.contains_key("systemd-resolved"));
    // containerd 2.x comes pinned from the artifact store, not from Debian (1.6).
    assert!(
        !m.packages.contains_key("containerd"),
        "{:?}",
        m.packages.keys()
    );
    assert!(!m.packages.contains_key("openssh-server"));
    let yaml = fs::read_to_string(image.dir.join("bootimage.yaml")).unwrap();
    assert!(yaml.contains("kind: BootImage") && yaml.contains(&m.verity.root_hash));
    let total: u64 = ["vmlinuz", "initramfs", "rootfs.squashfs"]
        .iter()
        .map(|f| m.artifacts[*f].size)
        .sum();
    eprintln!("kernel+initramfs+rootfs = {:.1} MB", total as f64 / 1e6);

    // A changed artifact is caught by `verify`.
    let copy = image.dir.parent().unwrap().join("tampered-manifest");
    let _ = fs::remove_dir_all(&copy);
    fs::create_dir_all(&copy).unwrap();
    for e in fs::read_dir(&image.dir).unwrap().flatten() {
        fs::hard_link(e.path(), copy.join(e.file_name())).unwrap();
    }
    fs::remove_file(copy.join("initramfs")).unwrap();
    fs::write(copy.join("initramfs"), b"not the initramfs").unwrap();
    let err = verify_image(&copy, &public).unwrap_err().to_string();
    assert!(err.contains("initramfs: size 17"), "{err}");
    let _ = fs::remove_dir_all(&copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootfs_boots_under_nspawn_to_active_agent() {
    let image = tokio::task::spawn_blocking(image).await.unwrap();
    let tree = tempfile::Builder::new()
        .prefix("tether-image-root-")
        .tempdir()
        .unwrap();
    let root = tree.path().join("root");
    let out = Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&root)
        .arg(image.dir.join("rootfs.squashfs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unsquashfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let container = Container::boot(&root, ContainerOptions::default())
        .await
        .expect("boot the image's rootfs under systemd-nspawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut state = String::new();
    while Instant::now() < deadline {
        state = container
            .systemd()
            .active_state("tether-agent.service")
            .await
            .unwrap();
        if state == "active" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(state, "active", "console:\n{}", container.console_tail(40));
    let key = fs::read_to_string(container.path("/usr/share/tether/image-signing.pub")).unwrap();
    assert_eq!(
        key,
        fs::read_to_string(&image.key).unwrap(),
        "public key baked in"
    );
    assert_eq!(
        fs::metadata(root.join("etc/machine-id")).unwrap().len(),
        0,
        "machine-id empty in the image"
    );
    assert!(!root.join("usr/sbin/sshd").exists(), "no SSH server");
    assert!(
        fs::read_link(root.join("etc/systemd/system/systemd-firstboot.service")).unwrap()
            == Path::new("/dev/null"),
        "firstboot masked"
    );
}

#[test]
fn image_boots_in_qemu_to_active_agent() {
    let image = image();
    let mut vm = Vm::boot(image, "vmlinux", &image.dir.join("rootfs.squashfs"), "good");
    vm.wait_for("tether-initramfs: rootfs verified", "REFUSING TO BOOT");
    vm.wait_for("tether-agent started", "REFUSING TO BOOT");
    // The unit is `Type=notify`. systemd's "Started" line is no witness: it stops printing
    // unit status on the console once the serial getty owns it, which under load comes
    // first. The agent logs (to the console as well) right after it sent READY=1.
    let took = vm.wait_for(
        "ready: READY=1 sent to systemd",
        "Failed to start \u{1b}[0;1;39mtether-agent.service",
    );
    eprintln!(
        "qemu TCG vmlinux boot to tether-agent: {:.1}s",
        took.as_secs_f64()
    );
}

#[test]
fn flipped_rootfs_byte_refuses_to_boot() {
    let image = image();
    let work = image.dir.parent().unwrap().join("flipped");
    fs::create_dir_all(&work).unwrap();
    let bad = work.join("rootfs.squashfs");
    fs::copy(image.dir.join("rootfs.squashfs"), &bad).unwrap();
    // One byte in the middle of the file system (the data area, not the hash tree).
    let offset = image.manifest.verity.hash_offset / 2;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bad)
        .unwrap();
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut byte).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[byte[0] ^ 0x01]).unwrap();
    drop(f);
    let mut vm = Vm::boot(image, "vmlinux", &bad, "flipped");
    vm.wait_for("REFUSING TO BOOT", "tether-initramfs: rootfs verified");
    // Give it a moment: nothing after the refusal may start.
    std::thread::sleep(Duration::from_secs(3));
    let console = vm.console();
    assert!(
        console.contains("does not match root hash"),
        "{}",
        tail(&console)
    );
    assert!(
        !console.contains("tether-agent started") && !console.contains("Welcome to"),
        "{}",
        tail(&console)
    );
}

fn sha256s(dir: &Path) -> Vec<(String, String)> {
    use sha2::{Digest, Sha256};
    let mut out: Vec<(String, String)> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let data = fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                hex::encode(Sha256::digest(&data)),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn two_builds_are_byte_identical() {
    let image = image();
    let out = image.dir.parent().unwrap().join("image-again");
    // The second build runs mmdebstrap afresh (the .deb cache is shared).
    let key = image.key.with_file_name("signing.key");
    build(&options(&out, &key, &agent_binary(), true)).expect("second build");
    let (a, b) = (sha256s(&image.dir), sha256s(&out));
    assert_eq!(a.len(), 7, "{a:?}");
    for ((fa, ha), (fb, hb)) in a.iter().zip(&b) {
        assert_eq!(fa, fb);
        assert_eq!(ha, hb, "{fa} differs between two builds of the same spec");
    }
}

#[test]
fn bad_input_fails_clearly_and_leaves_out_alone() {
    let dir = scratch().join("bad-input");
    fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    if !keys.exists() {
        keys::keygen(&keys).unwrap();
    }
    let key = keys.join("signing.key");
    let agent = std::env::current_exe().unwrap(); // any ELF will do: these builds never start
    let out = dir.join("out");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("manifest.json"), b"previous image").unwrap();
    let spec = |name: &str, text: &str| {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    };
    let run = |spec: PathBuf, out: &Path, key: &Path, agent: &Path| {
        build(&BuildOptions {
            spec,
            out: out.to_path_buf(),
            agent: Some(agent.to_path_buf()),
            key: Some(key.to_path_buf()),
            fresh: false,
            format: Some(RootfsFormat::Squashfs),
        })
        .unwrap_err()
    };
    let good = spec("good.toml", "version = \"1\"\n");
    let cases: Vec<(Error, &str)> = vec![
        (
            run(
                spec("bad.toml", "version = \"1\"\nbogus = true\n"),
                &out,
                &key,
                &agent,
            ),
            "unknown field `bogus`",
        ),
        (
            run(
                spec(
                    "pkg.toml",
                    "version = \"1\"\npackages = [\"tether-no-such-package\"]\n",
                ),
                &out,
                &key,
                &agent,
            ),
            "\"tether-no-such-package\" is not available",
        ),
        (
            run(good.clone(), &out, &dir.join("no-key"), &agent),
            "read key",
        ),
        (
            run(good.clone(), &out, &key, &good),
            "is not an ELF executable",
        ),
    ];
    for (err, want) in &cases {
        assert!(err.to_string().contains(want), "{err} lacks {want}");
    }
    // No space: OUT on a 32 MiB tmpfs.
    let small = dir.join("small");
    fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success());
    let err = run(good.clone(), &small.join("out"), &key, &agent);
    let listing: Vec<_> = fs::read_dir(&small)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let _ = Command::new("umount").arg(&small).status();
    assert!(err.to_string().contains("not enough space"), "{err}");
    assert!(
        listing.is_empty(),
        "nothing written on the small fs: {listing:?}"
    );
    // The previous OUT is untouched and no staging directory is left.
    assert_eq!(
        fs::read(out.join("manifest.json")).unwrap(),
        b"previous image"
    );
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The ESP's entries directory listing (`mdir -b`), read from a disk image with mtools.
fn esp_entries(disk: &Path, esp_offset: u64) -> Vec<String> {
    let out = Command::new("mdir")
        .arg("-i")
        .arg(format!("{}@@{esp_offset}", disk.display()))
        .args(["-b", "::/loader/entries"])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("mdir (mtools)");
    assert!(
        out.status.success(),
        "mdir: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter(|n| n.ends_with(".conf"))
        .map(String::from)
        .collect();
    names.sort();
    names
}

/// `disk.raw` (spec `disk = true`) boots under OVMF through Debian's systemd-boot into slot
/// A's entry to an active agent, and systemd-boot counts the try: `tether-a+3.conf` becomes
/// `tether-a+2-1.conf` on the ESP, and the `/etc` overlay lands on the state partition.
/// Also: the disk is reproducible from the same inputs. "Power off" is stopping qemu once the
/// agent is up: systemd-boot renamed the entry (and flushed the ESP) before Linux started.
/// (ACPI `system_powerdown` is not acted on this early in boot, so it is not used.)
#[test]
fn disk_boots_under_ovmf_and_counts_the_try() {
    use tether_boot::slot::{BOOT_TRIES, Slot};
    use tether_image::disk::{DiskInputs, write_disk};
    use tether_image::gpt::SECTOR;
    // A second build of the example image (warm caches) with disk = true.
    let image = image();
    let out = image.dir.parent().unwrap().join("image-disk");
    let key = image.key.with_file_name("signing.key");
    let mut opts = options(&out, &key, &agent_binary(), false);
    opts.spec = workspace().join("image-builder/examples/disk.toml");
    let report = build(&opts).expect("build the example image with disk = true");
    let m = report.manifest.unwrap();
    assert!(m.artifacts.contains_key("disk.raw"), "disk.raw in manifest");
    let yaml = fs::read_to_string(out.join("bootimage.yaml")).unwrap();
    assert!(yaml.contains("disk:"), "{yaml}");

    // Same inputs, same bytes.
    let again = out.parent().unwrap().join("disk-again.raw");
    let layout = write_disk(
        &DiskInputs {
            dir: &out,
            rootfs_file: "rootfs.squashfs",
            version: &m.version,
            extra_cmdline: "console=tty0 console=ttyS0",
            fstype: "squashfs",
            verity: &m.verity,
            epoch: m.source_date_epoch,
        },
        &again,
    )
    .unwrap();
    let sha = |p: &Path| {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        std::io::copy(&mut fs::File::open(p).unwrap(), &mut h).unwrap();
        hex::encode(h.finalize())
    };
    assert_eq!(
        sha(&again),
        m.artifacts["disk.raw"].sha256,
        "disk.raw reproducible"
    );
    fs::remove_file(&again).unwrap();

    let esp_offset = layout.partitions[0].first_lba * SECTOR;
    let state_offset = layout.partitions[3].first_lba * SECTOR;
    let fresh = Slot::A.entry_file_name(Some(BOOT_TRIES));
    assert_eq!(
        esp_entries(&out.join("disk.raw"), esp_offset),
        [fresh.clone(), Slot::B.entry_file_name(Some(BOOT_TRIES))]
    );

    // Boot a copy (the VM writes to it) with OVMF and its own copy of the variable store.
    let work = out.parent().unwrap().join("vm-disk");
    fs::create_dir_all(&work).unwrap();
    let disk = work.join("disk.raw");
    let _ = fs::remove_file(&disk);
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(out.join("disk.raw"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(cp.success());
    let spawned = Instant::now();
    let mut vm = Vm(Qemu::new(&work.join("serial.log"), 1536)
        .ovmf(&work.join("OVMF_VARS.fd"))
        .expect("OVMF (Debian package ovmf)")
        .args([
            "-drive",
            &format!("if=virtio,format=raw,file={}", disk.display()),
        ])
        .args(["-nic", "none"])
        .spawn()
        .expect("start qemu"));
    vm.wait_for("tether-initramfs: rootfs verified", "REFUSING TO BOOT");
    vm.wait_for("tether-agent started", "REFUSING TO BOOT");
    let took = spawned.elapsed();
    let console = vm.console();
    assert!(
        console.contains("tether.slot=a") && console.contains("verifying /dev/vda2"),
        "booted slot A: {}",
        tail(&console)
    );
    eprintln!(
        "qemu TCG OVMF + systemd-boot disk boot to tether-agent: {:.1}s",
        took.as_secs_f64()
    );
    // Power off: stop qemu once ext4 has committed its journal (5 s), then read the ESP.
    std::thread::sleep(Duration::from_secs(8));
    drop(vm);
    assert_eq!(
        esp_entries(&disk, esp_offset),
        [
            "tether-a+2-1.conf".to_string(),
            Slot::B.entry_file_name(Some(BOOT_TRIES))
        ],
        "systemd-boot decremented slot A's counter"
    );
    // The /etc overlay lived on the state partition: the fresh machine-id is there (after
    // e2fsck replays the journal of the uncleanly stopped file system, on a copy).
    let state = work.join("state.img");
    let dd = Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", state.display()))
        .arg("bs=1M")
        .arg(format!("skip={}", state_offset >> 20))
        .arg(format!("count={}", layout.partitions[3].size() >> 20))
        .args(["conv=sparse", "status=none"])
        .status()
        .unwrap();
    assert!(dd.success());
    let fsck = Command::new("e2fsck")
        .arg("-fy")
        .arg(&state)
        .output()
        .expect("e2fsck (e2fsprogs)");
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let out = Command::new("debugfs")
        .args(["-R", "ls /overlay/etc/upper"])
        .arg(&state)
        .output()
        .expect("debugfs (e2fsprogs)");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("machine-id"),
        "state partition's /etc overlay: {listing} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::remove_dir_all(&work);
}
