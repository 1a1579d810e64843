//! The booted site every later node test reuses: one [`Segment`] (bridge namespace, the
//! site's own DHCP server, an uplink to the host), a `tether-operator standalone` whose
//! machine API and tenants are published on the uplink's address, the example image as a
//! `BootImage`, and `tether-pxe` on the uplink in its default proxyDHCP mode with the cluster
//! source. Started once per test binary ([`site`]), stopped when the binary exits (the
//! management plane's children included), and reaped by the next run if it was killed.
//!
//! Helpers attach machines: [`Site::pxe_vm`] (a qemu VM, TCG, that network-boots on the
//! segment) and [`Site::nspawn_node`] (the image's rootfs under systemd-nspawn in its own
//! namespace wired to the bridge, with an optional NoCloud seed directory).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tether_boot::CaPin;
use tether_testkit::NetNs;
use tether_testkit::nspawn::{Bind, Container, ContainerOptions};
use tether_testkit::process::Process;
use tether_testkit::qemu::{Qemu, Vm};
use tether_testkit::segment::Segment;

use crate::image::{self, Built};

/// The site.
pub struct Site {
    /// Where logs and state live (kept with `TETHER_KEEP_TEST_DIRS`).
    pub dir: PathBuf,
    /// The management kubeconfig.
    pub kubeconfig: PathBuf,
    /// The machine API as published (`url`, pin).
    pub api_url: String,
    /// The machine API CA's pin.
    pub pin: CaPin,
    /// The image machines boot, and its BootImage name.
    pub image: &'static Built,
    /// The BootImage name.
    pub boot_image: String,
    /// The host's address on the segment.
    pub host_ip: Ipv4Addr,
    /// tether-pxe's HTTP base URL.
    pub pxe_url: String,
    operator_bin: PathBuf,
    parts: Mutex<Parts>,
    _tmp: Option<tempfile::TempDir>,
}

struct Parts {
    pxe: Option<Process>,
    operator: Option<Process>,
    segment: Option<Segment>,
    next_mac: u8,
}

/// The site of this test binary, started on first use.
pub fn site() -> &'static Site {
    static SITE: OnceLock<Site> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    SITE.get_or_init(|| {
        let site = Site::start().unwrap_or_else(|e| panic!("start the site: {e}"));
        // Statics are never dropped: stop the site when the test binary exits.
        extern "C" fn stop() {
            if let Some(s) = SITE.get() {
                s.stop();
            }
        }
        // SAFETY: registering a plain `extern "C"` function with the C runtime.
        unsafe { libc::atexit(stop) };
        site
    })
}

/// The pinned kubectl with `kubeconfig`; stdout, or the error with stderr.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(
        tether_testkit::binaries::binary(tether_upstream::Component::Kubectl)
            .map_err(|e| e.to_string())?,
    )
    .arg("--kubeconfig")
    .arg(kubeconfig)
    .args(args)
    .output()
    .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_file(path: &Path, what: &str, proc: &mut Process, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        proc.check_running().map_err(|e| e.to_string())?;
        if Instant::now() > deadline {
            return Err(format!(
                "{what} not ready after {timeout:?}:\n{}",
                proc.log_tail(30)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What a site is made of: where it lives, the image it serves and the programs it runs.
pub struct SiteConfig {
    /// Its directory (logs, state, serial consoles).
    pub dir: PathBuf,
    /// The built image, served by tether-pxe and published as a BootImage.
    pub image: &'static Built,
    /// The `tether-operator` binary.
    pub operator: PathBuf,
    /// The `tether-pxe` binary.
    pub pxe: PathBuf,
}

impl Site {
    fn start() -> Result<Site, String> {
        let started = Instant::now();
        let tmp = tether_testkit::test_dir("tether-site-").map_err(|e| e.to_string())?;
        let image = image::image();
        eprintln!("site: image ready after {:?}", started.elapsed());
        let mut site = Site::start_with(SiteConfig {
            dir: tmp.path().to_path_buf(),
            image,
            operator: image::workspace_binary("tether-operator", "tether-operator"),
            pxe: image::workspace_binary("tether-pxe", "tether-pxe"),
        })?;
        site._tmp = Some(tmp);
        eprintln!(
            "site: segment {}/24, machine API {}, tether-pxe {}, up after {:?}",
            site.host_ip,
            site.api_url,
            site.pxe_url,
            started.elapsed()
        );
        Ok(site)
    }

    /// Makes the segment and starts the management plane on it, publishes the image and
    /// starts tether-pxe; all of it stops with [`Site::stop`] (or with the process, through
    /// the testkit's records, if it dies first).
    pub fn start_with(config: SiteConfig) -> Result<Site, String> {
        let SiteConfig {
            dir,
            image,
            operator: operator_bin,
            pxe: pxe_bin,
        } = config;
        let segment = Segment::create(&dir).map_err(|e| e.to_string())?;
        let host_ip = segment.host_ip();

        // The management plane, published on the segment.
        let data = dir.join("standalone");
        let mut cmd = Command::new(&operator_bin);
        cmd.args(["standalone", "--data-dir"])
            .arg(&data)
            .args(["--advertise-address", &host_ip.to_string()])
            // Joined machines are told the segment's DNS and NTP server (the site's dnsmasq
            // answers DNS; DHCP names the same servers).
            .args(["--node-dns-servers", &host_ip.to_string()])
            .args(["--node-ntp-servers", &host_ip.to_string()])
            .env("RUST_LOG", "info,kube_client=warn,kube_runtime=warn");
        let mut operator = Process::spawn("tether-operator", cmd, &dir.join("operator.log"))
            .map_err(|e| e.to_string())?;
        wait_file(
            &data.join("ready"),
            "standalone",
            &mut operator,
            Duration::from_secs(120),
        )?;
        let kubeconfig = data.join("management.kubeconfig");
        let (api_url, pin) =
            tether_testkit::published::machine_api(&kubeconfig, Duration::from_secs(60))
                .map_err(|e| format!("{e}\n{}", operator.log_tail(30)))?;

        // The image as a BootImage.
        kubectl(
            &kubeconfig,
            &[
                "apply",
                "-f",
                &image.dir.join("bootimage.yaml").display().to_string(),
            ],
        )
        .map_err(|e| format!("apply the BootImage: {e}"))?;
        let boot_image = tether_image::boot::object_name(&image.manifest.version);

        // tether-pxe on the uplink: proxyDHCP next to the site's dnsmasq, cluster source.
        let http_port = tether_testkit::ports::free_port();
        let pxe_url = format!("http://{host_ip}:{http_port}");
        let mut cmd = Command::new(&pxe_bin);
        cmd.args(["serve", "--interface", segment.uplink()])
            .args(["--cluster", "--namespace", "tether-system"])
            .args(["--default-image", &boot_image])
            .arg("--artifacts-dir")
            .arg(&image.dir)
            .args(["--http-port", &http_port.to_string()])
            .args([
                "--tftp-port",
                &tether_testkit::ports::free_port().to_string(),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,tether_pxe=debug,kube_client=warn");
        let mut pxe =
            Process::spawn("tether-pxe", cmd, &dir.join("pxe.log")).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pxe.log_tail(200).contains("tether-pxe serving") {
            pxe.check_running().map_err(|e| e.to_string())?;
            if Instant::now() > deadline {
                return Err(format!("tether-pxe not serving:\n{}", pxe.log_tail(30)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Site {
            dir,
            kubeconfig,
            api_url,
            pin,
            image,
            boot_image,
            host_ip,
            pxe_url,
            operator_bin,
            parts: Mutex::new(Parts {
                pxe: Some(pxe),
                operator: Some(operator),
                segment: Some(segment),
                next_mac: 0x10,
            }),
            _tmp: None,
        })
    }

    /// Stops tether-pxe, then the management plane (SIGTERM: standalone stops its tenants
    /// first), then removes the segment.
    pub fn stop(&self) {
        let mut p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut pxe) = p.pxe.take() {
            pxe.stop(Duration::from_secs(5));
        }
        // SIGTERM lets standalone stop its tenants and its management plane.
        if let Some(mut op) = p.operator.take() {
            op.stop(Duration::from_secs(30));
        }
        drop(p.segment.take());
    }

    /// The segment's network namespace (where the bridge, the site's DHCP server and the
    /// VMs' qemu processes live).
    pub fn namespace(&self) -> String {
        let p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        p.segment
            .as_ref()
            .map(|s| s.netns().name().to_string())
            .unwrap_or_default()
    }

    /// Fails with the log's tail when tether-pxe or the management plane has exited.
    pub fn check_running(&self) -> Result<(), String> {
        let mut p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let Parts { pxe, operator, .. } = &mut *p;
        for proc in [pxe.as_mut(), operator.as_mut()].into_iter().flatten() {
            proc.check_running().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// kubectl against the management cluster; stdout, or the error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        kubectl(&self.kubeconfig, args)
    }

    /// A client for the management cluster (made on the caller's runtime).
    pub async fn client(&self) -> kube::Client {
        let kc = std::fs::read_to_string(&self.kubeconfig).unwrap();
        tether_operator::kube::client_from_kubeconfig(&kc)
            .await
            .unwrap()
    }

    /// `tether-operator token …` with the site's kubeconfig; stdout.
    pub fn token(&self, args: &[&str]) -> String {
        run(Command::new(&self.operator_bin)
            .arg("token")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig))
    }

    /// A MAC no other machine of this site has (`52:54:00:5e:<pid byte>:<n>`).
    pub fn next_mac(&self) -> String {
        let mut p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        p.next_mac = p.next_mac.wrapping_add(1);
        format!(
            "52:54:00:5e:{:02x}:{:02x}",
            std::process::id() % 256,
            p.next_mac
        )
    }

    /// tether-pxe's log tail.
    pub fn pxe_log(&self) -> String {
        let p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        p.pxe.as_ref().map(|x| x.log_tail(80)).unwrap_or_default()
    }

    /// The operator's log tail.
    pub fn operator_log(&self) -> String {
        let p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        p.operator
            .as_ref()
            .map(|x| x.log_tail(80))
            .unwrap_or_default()
    }

    /// The site DHCP server's log tail.
    pub fn dhcp_log(&self) -> String {
        let p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        p.segment.as_ref().map(|s| s.dhcp_log()).unwrap_or_default()
    }

    /// The SMBIOS UUID [`Site::pxe_vm`] gives the VM with `mac` (as a real board has one).
    pub fn uuid_of(mac: &str) -> String {
        format!("4c4c4544-0000-1000-8000-{}", mac.replace(':', ""))
    }

    /// A qemu VM (TCG) with `memory_mib` of RAM, one virtio NIC on the segment and the
    /// SMBIOS UUID [`Site::uuid_of`] its MAC; its serial console goes to
    /// `<dir>/<name>.serial`.
    pub fn vm_on_segment(&self, name: &str, mac: &str, memory_mib: u32) -> Qemu {
        let p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let segment = p.segment.as_ref().expect("site is up");
        let tap = segment.add_tap().expect("tap on the segment");
        Qemu::new_in(
            segment.netns(),
            &self.dir.join(format!("{name}.serial")),
            memory_mib,
        )
        .args([
            "-netdev".to_string(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=n0,mac={mac}"),
            "-uuid".to_string(),
            Site::uuid_of(mac),
        ])
    }

    /// A VM on the segment (SeaBIOS, qemu's iPXE ROM) that boots from the network.
    pub fn pxe_vm(&self, name: &str, mac: &str) -> Vm {
        self.vm_on_segment(name, mac, 1536)
            .args(["-boot", "n"])
            .spawn()
            .expect("start qemu")
    }

    /// A VM on the segment that boots the image's kernel directly (no PXE, so no `tether.*`
    /// enrollment words on its command line), with `disk` attached read-only as a virtio
    /// disk — e.g. a NoCloud `cidata` volume.
    pub fn direct_vm(&self, name: &str, mac: &str, disk: &Path) -> Vm {
        let initrd = self.combined_initrd();
        self.vm_on_segment(name, mac, 1536)
            .direct_boot(
                &self.image.dir.join("vmlinux"),
                &initrd,
                &self.image.manifest.cmdline,
            )
            .args([
                "-drive".to_string(),
                format!("file={},if=virtio,format=raw,readonly=on", disk.display()),
            ])
            .spawn()
            .expect("start qemu")
    }

    /// A VM on the segment that boots `disk` (a `disk.raw`, copied sparsely to
    /// `<dir>/<name>.disk.raw` because the VM writes to it) under OVMF through systemd-boot,
    /// with `seed` attached read-only as a second virtio disk — a NoCloud `cidata` volume.
    pub fn disk_vm(
        &self,
        name: &str,
        mac: &str,
        memory_mib: u32,
        vcpus: u32,
        disk: &Path,
        seed: &Path,
    ) -> Result<Vm, String> {
        let copy = self.dir.join(format!("{name}.disk.raw"));
        let _ = std::fs::remove_file(&copy);
        let out = Command::new("cp")
            .arg("--sparse=always")
            .arg(disk)
            .arg(&copy)
            .output()
            .map_err(|e| format!("cp: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "copy {}: {}",
                disk.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        self.vm_on_segment(name, mac, memory_mib)
            .vcpus(vcpus)
            .ovmf(&self.dir.join(format!("{name}.OVMF_VARS.fd")))
            .map_err(|e| e.to_string())?
            .args([
                "-drive".to_string(),
                format!("if=none,id=disk,format=raw,file={}", copy.display()),
                // The disk before the NIC: OVMF would otherwise try PXE first.
                "-device".to_string(),
                "virtio-blk-pci,drive=disk,bootindex=0".to_string(),
                "-drive".to_string(),
                format!("file={},if=virtio,format=raw,readonly=on", seed.display()),
            ])
            .spawn()
            .map_err(|e| e.to_string())
    }

    /// A NoCloud volume `<dir>/<name>.img`: 4 MiB of vfat labelled `CIDATA` holding
    /// `user-data` and a `meta-data` naming `name` as the instance (cloud-init's seed disk).
    pub fn cidata_volume(&self, name: &str, user_data: &str) -> Result<PathBuf, String> {
        let seed = self.seed_dir(name, user_data);
        let img = self.dir.join(format!("{name}.img"));
        let _ = std::fs::remove_file(&img);
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        run(Command::new("truncate").args(["-s", "4M"]).arg(&img))?;
        run(Command::new("mkfs.vfat").args(["-n", "CIDATA"]).arg(&img))?;
        for f in ["user-data", "meta-data"] {
            run(Command::new("mcopy")
                .arg("-i")
                .arg(&img)
                .arg(seed.join(f))
                .arg(format!("::{f}")))?;
        }
        Ok(img)
    }

    /// The image's initramfs with its rootfs appended (what tether-pxe serves), written
    /// once into the site's directory; for VMs that boot the kernel directly.
    pub fn combined_initrd(&self) -> PathBuf {
        static INITRD: OnceLock<PathBuf> = OnceLock::new();
        INITRD
            .get_or_init(|| {
                let out = self.dir.join("initrd-with-rootfs.img");
                tether_image::build::write_combined_initrd(
                    &self.image.dir,
                    "rootfs.squashfs",
                    &out,
                )
                .expect("combine initramfs and rootfs");
                out
            })
            .clone()
    }

    /// A NoCloud seed directory `<dir>/<name>` holding `user_data` and a `meta-data` naming
    /// `name` as the instance.
    pub fn seed_dir(&self, name: &str, user_data: &str) -> PathBuf {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("user-data"), user_data).unwrap();
        std::fs::write(dir.join("meta-data"), format!("instance-id: {name}\n")).unwrap();
        dir
    }

    /// The image's rootfs, unpacked once (nspawn boots it with a volatile overlay).
    pub fn rootfs(&self) -> PathBuf {
        static ROOT: OnceLock<PathBuf> = OnceLock::new();
        ROOT.get_or_init(|| {
            let root = self.dir.join("rootfs");
            run(Command::new("unsquashfs")
                .args(["-q", "-n", "-d"])
                .arg(&root)
                .arg(self.image.dir.join("rootfs.squashfs")));
            root
        })
        .clone()
    }

    /// A node network namespace on the segment (`eth0` with `mac`).
    pub fn node_netns(&self, mac: &str) -> NetNs {
        let p = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        p.segment
            .as_ref()
            .expect("site is up")
            .add_node_netns(mac)
            .expect("node netns")
    }

    /// The image's rootfs booted under systemd-nspawn in `netns`, with `seed` (a directory
    /// holding `user-data` and `meta-data`) as its NoCloud seed directory.
    pub async fn nspawn_node(&self, netns: &NetNs, seed: Option<&Path>) -> Container {
        let mut binds = Vec::new();
        if let Some(s) = seed {
            binds.push(Bind {
                host: s.to_path_buf(),
                container: PathBuf::from("/var/lib/cloud/seed/nocloud"),
                read_only: true,
            });
        }
        Container::boot(
            &self.rootfs(),
            ContainerOptions {
                netns: Some(netns),
                binds,
                kubernetes_node: false,
            },
        )
        .await
        .expect("boot the image under systemd-nspawn")
    }
}
