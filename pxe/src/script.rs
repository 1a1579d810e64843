//! iPXE script rendering. Every value that ends up in a script or on a kernel command line is
//! validated against a small allow-list first: an iPXE script is code (`${…}` expands
//! settings, `||`/`&&` chain commands, whitespace splits arguments), so a label, token or URL
//! pasted raw would let whoever controls it run commands on the booting machine.
//!
//! The kernel command line is the image's own, parsed and rendered by the shared
//! [`BootParams`] (so the `tether.*` words are spelled in one place), with the per-machine
//! words set on it; every rendered word is then checked again for iPXE safety.
//!
//! The rootfs of a `tether.root=file:PATH` image must reach the initramfs as the cpio entry
//! PATH (see [`tether_boot::initrd`]). iPXE builds that entry by itself only on BIOS: Debian
//! bookworm's iPXE (1.0.0+git-20190125.36a4c85) wraps an initrd given a file name
//! (`initrd URL PATH mode=0400`) in its bzImage loader, while its UEFI build hands initrds to
//! the kernel's EFI stub raw through its virtual file system. So the script branches on
//! `${platform}`: BIOS lets iPXE wrap, UEFI loads the copy tether-pxe serves already wrapped
//! (`/artifacts/sha256/<hex>/cpio/<path>`), which exists only for artifacts we hold.

use tether_boot::cmdline::{BootParams, Root, check_url};
use tether_boot::initrd::ROOTFS_MODE;
use tether_boot::{CaPin, Mac, Token};

use crate::error::{Error, Result};

/// The DHCP user-class our scripts set before any further DHCP, so the server knows the
/// client is an iPXE it already handed a script to and never chainloads it again.
pub const OUR_USER_CLASS: &str = "tether";

/// iPXE image names of the initrds, in load order; `initrd=<name>` words tell the kernel's
/// EFI stub which of iPXE's files to load (BIOS kernels ignore them).
pub const INITRD_NAME: &str = "initrd";
/// The image name of the rootfs initrd.
pub const ROOTFS_NAME: &str = "rootfs";

/// Path prefix, under an artifact's URL, of its copy wrapped as one cpio entry.
pub const CPIO_SUFFIX: &str = "/cpio";

/// One file a script loads, by content hash and the URL it is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRef {
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
    /// Where the machine fetches it (our `/artifacts/sha256/<hex>` or the image's own URL).
    pub url: String,
}

/// The rootfs of an image that boots from `tether.root=file:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsRef {
    /// The raw file system image (iPXE wraps it on BIOS).
    pub artifact: ArtifactRef,
    /// The cpio entry the initramfs expects (`/rootfs.img`), from the image's `tether.root`.
    pub path: String,
    /// Our copy already wrapped as that entry, when we hold the artifact (for UEFI).
    pub wrapped_url: Option<String>,
}

/// What one machine should boot: the result of asking a [`crate::source::BootSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    /// The `Machine` (or configuration entry) name, for logs and the script's comment.
    pub machine: String,
    /// The image version, for logs and the script's comment.
    pub image_version: String,
    /// The kernel.
    pub kernel: ArtifactRef,
    /// The initramfs.
    pub initrd: Option<ArtifactRef>,
    /// The rootfs, for images that boot from a file in the initramfs.
    pub rootfs: Option<RootfsRef>,
    /// The kernel command line: the image's, with `tether.mac`/`api`/`ca`/`token` set.
    pub params: BootParams,
}

/// What the node needs to enroll, put on its kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enrollment {
    /// The machine API base URL (`tether.api=`).
    pub api_url: Option<String>,
    /// The machine API's CA pin (`tether.ca=`).
    pub ca_pin: Option<CaPin>,
    /// The enrollment token (`tether.token=`).
    pub token: Option<Token>,
}

impl Enrollment {
    /// Checks the URL (the pin and token are checked by their types).
    pub fn new(
        api_url: Option<String>,
        ca_pin: Option<CaPin>,
        token: Option<Token>,
    ) -> Result<Enrollment> {
        if let Some(u) = &api_url {
            check_url(tether_boot::cmdline::API, u)?;
        }
        Ok(Enrollment {
            api_url,
            ca_pin,
            token,
        })
    }
}

/// Checks one kernel command-line word (`key=value` or a flag) for iPXE: printable ASCII,
/// no quoting, expansion or command characters.
pub fn check_cmdline_word(word: &str) -> Result<()> {
    let unsafe_ = |why| Error::Unsafe {
        what: "kernel command-line argument",
        value: word.chars().take(256).collect(),
        why,
    };
    if word.is_empty() {
        return Err(unsafe_("is empty"));
    }
    if let Some(c) = word.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(unsafe_(if c.is_whitespace() {
            "contains whitespace"
        } else {
            "contains a non-printable or non-ASCII character"
        }));
    }
    if word.contains(['$', '{', '}', '"', '\'', '\\', ';', '|', '`', '#']) {
        return Err(unsafe_(
            "contains a quoting, expansion or command character",
        ));
    }
    if word == "&&" || word == "||" {
        return Err(unsafe_("is an iPXE command separator"));
    }
    Ok(())
}

/// Checks a lower-case hex sha256.
pub fn check_sha256(what: &'static str, hex: &str) -> Result<()> {
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::Unsafe {
            what,
            value: hex.chars().take(80).collect(),
            why: "must be 64 lower-case hex digits",
        });
    }
    Ok(())
}

/// Checks a cpio entry path the way `tether.root=file:PATH` is checked, and that it names
/// a file (not a directory: no trailing `/`).
pub fn check_entry_path(path: &str) -> Result<()> {
    if path.ends_with('/') {
        return Err(Error::Unsafe {
            what: "cpio entry path",
            value: path.chars().take(128).collect(),
            why: "must name a file, not a directory",
        });
    }
    BootParams {
        root: Some(Root::File(path.to_string())),
        ..BootParams::default()
    }
    .render()?;
    Ok(())
}

/// Checks a name shown in the script's comment (machine name, image version).
fn check_label(what: &'static str, s: &str) -> Result<()> {
    if s.is_empty()
        || s.len() > 253
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    {
        return Err(Error::Unsafe {
            what,
            value: s.chars().take(64).collect(),
            why: "must be 1-253 characters of A-Z a-z 0-9 . _ + -",
        });
    }
    Ok(())
}

/// The kernel command line of a plan: `initrd=<name>` for each initrd (for the EFI stub),
/// then the plan's parameters rendered by [`BootParams`], every word checked for iPXE.
pub fn kernel_cmdline(plan: &BootPlan) -> Result<String> {
    let mut params = plan.params.clone();
    let mut words: Vec<String> = Vec::new();
    if plan.initrd.is_some() {
        words.push(format!("initrd={INITRD_NAME}"));
    }
    if plan.rootfs.is_some() {
        words.push(format!("initrd={ROOTFS_NAME}"));
    }
    words.append(&mut params.other);
    params.other = words;
    let line = params.render()?;
    for w in line.split(' ') {
        check_cmdline_word(w)?;
    }
    Ok(line)
}

/// Renders the iPXE script for `mac`. `server` is our own base URL (`http://10.0.0.1:8080`),
/// used for the boot beacon.
pub fn render(plan: &BootPlan, mac: Mac, server: &str) -> Result<String> {
    check_url("server URL", server)?;
    check_label("machine name", &plan.machine)?;
    check_label("image version", &plan.image_version)?;
    let check_artifact = |what: &'static str, a: &ArtifactRef| -> Result<()> {
        check_sha256(what, &a.sha256)?;
        check_url(what, &a.url)?;
        Ok(())
    };
    check_artifact("kernel", &plan.kernel)?;
    if let Some(i) = &plan.initrd {
        check_artifact("initrd", i)?;
    }
    if let Some(r) = &plan.rootfs {
        check_artifact("rootfs", &r.artifact)?;
        check_entry_path(&r.path)?;
        if let Some(w) = &r.wrapped_url {
            check_url("wrapped rootfs", w)?;
        }
    }
    let cmdline = kernel_cmdline(plan)?;
    let dashed = mac.dashed();
    let mut s = String::new();
    s.push_str("#!ipxe\n");
    s.push_str(&format!(
        "# tether-pxe: machine {} image {}\n",
        plan.machine, plan.image_version
    ));
    s.push_str(&format!("set user-class {OUR_USER_CLASS}\n"));
    s.push_str(&format!(
        "imgfetch --name beacon {server}/boot/{dashed}/beacon && imgfree beacon || echo tether: boot beacon not delivered\n"
    ));
    s.push_str(&format!(
        "kernel --name kernel {} {cmdline} || goto failed\n",
        plan.kernel.url
    ));
    if let Some(i) = &plan.initrd {
        s.push_str(&format!(
            "initrd --name {INITRD_NAME} {} || goto failed\n",
            i.url
        ));
    }
    if let Some(r) = &plan.rootfs {
        s.push_str(
            "iseq ${platform} efi && goto tether_rootfs_efi || goto tether_rootfs_bios\n\
             :tether_rootfs_bios\n",
        );
        s.push_str(&format!(
            "initrd --name {ROOTFS_NAME} {} {} mode={ROOTFS_MODE:04o} || goto failed\n",
            r.artifact.url, r.path
        ));
        s.push_str("goto tether_boot\n:tether_rootfs_efi\n");
        match &r.wrapped_url {
            Some(w) => s.push_str(&format!("initrd --name {ROOTFS_NAME} {w} || goto failed\n")),
            None => s.push_str(
                "echo tether: UEFI iPXE cannot unpack the rootfs into the initramfs by itself and this server does not hold it\n\
                 goto failed\n",
            ),
        }
        s.push_str(":tether_boot\n");
    }
    s.push_str("boot || goto failed\n");
    s.push_str(":failed\necho tether: boot failed, retrying in 10 seconds\nsleep 10\nreboot\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn art(c: char) -> ArtifactRef {
        ArtifactRef {
            sha256: hex(c),
            url: format!("http://10.0.0.1/artifacts/sha256/{}", hex(c)),
        }
    }

    const MAC: Mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn plan() -> BootPlan {
        let mut params = BootParams::parse(&format!(
            "console=ttyS0 quiet tether.root=file:/rootfs.img tether.rootfstype=squashfs \
             tether.verity.roothash={} tether.verity.hashoffset=4096",
            hex('e')
        ))
        .unwrap();
        params.mac = Some(MAC);
        params.api = Some("https://10.0.0.1:6443".into());
        params.ca = Some(format!("sha256:{}", hex('d')).parse().unwrap());
        params.token = Some("abcdef.0123456789abcdef".parse().unwrap());
        BootPlan {
            machine: "mac-525400123456".into(),
            image_version: "2026.11.1".into(),
            kernel: art('a'),
            initrd: Some(art('b')),
            rootfs: Some(RootfsRef {
                artifact: art('c'),
                path: "/rootfs.img".into(),
                wrapped_url: Some(format!(
                    "http://10.0.0.1/artifacts/sha256/{}/cpio/rootfs.img",
                    hex('c')
                )),
            }),
            params,
        }
    }

    #[test]
    fn renders_full_script() {
        let s = render(&plan(), MAC, "http://10.0.0.1").unwrap();
        let want = format!(
            "#!ipxe\n\
             # tether-pxe: machine mac-525400123456 image 2026.11.1\n\
             set user-class tether\n\
             imgfetch --name beacon http://10.0.0.1/boot/52-54-00-12-34-56/beacon && imgfree beacon || echo tether: boot beacon not delivered\n\
             kernel --name kernel http://10.0.0.1/artifacts/sha256/{a} initrd=initrd initrd=rootfs console=ttyS0 quiet \
             tether.root=file:/rootfs.img tether.rootfstype=squashfs tether.verity.roothash={e} tether.verity.hashoffset=4096 \
             tether.mac=52:54:00:12:34:56 tether.api=https://10.0.0.1:6443 tether.ca=sha256:{d} tether.token=abcdef.0123456789abcdef || goto failed\n\
             initrd --name initrd http://10.0.0.1/artifacts/sha256/{b} || goto failed\n\
             iseq ${{platform}} efi && goto tether_rootfs_efi || goto tether_rootfs_bios\n\
             :tether_rootfs_bios\n\
             initrd --name rootfs http://10.0.0.1/artifacts/sha256/{c} /rootfs.img mode=0400 || goto failed\n\
             goto tether_boot\n\
             :tether_rootfs_efi\n\
             initrd --name rootfs http://10.0.0.1/artifacts/sha256/{c}/cpio/rootfs.img || goto failed\n\
             :tether_boot\n\
             boot || goto failed\n\
             :failed\necho tether: boot failed, retrying in 10 seconds\nsleep 10\nreboot\n",
            a = hex('a'),
            b = hex('b'),
            c = hex('c'),
            d = hex('d'),
            e = hex('e'),
        );
        assert_eq!(s, want);
    }

    #[test]
    fn rootfs_we_do_not_hold_fails_clearly_on_uefi() {
        let mut p = plan();
        p.rootfs.as_mut().unwrap().wrapped_url = None;
        let s = render(&p, MAC, "http://10.0.0.1").unwrap();
        let efi = s.split(":tether_rootfs_efi\n").nth(1).unwrap();
        assert!(
            efi.starts_with("echo tether: UEFI iPXE cannot unpack the rootfs")
                && efi.contains("\ngoto failed\n:tether_boot\n"),
            "{s}"
        );
    }

    #[test]
    fn injection_attempts_are_refused() {
        type Mutate = fn(&mut BootPlan);
        let cases: &[(&str, Mutate)] = &[
            ("cmdline expansion", |p| {
                p.params.other.push("a=${net0/ip}".into())
            }),
            ("cmdline chain", |p| p.params.other.push("||".into())),
            ("cmdline semicolon", |p| {
                p.params.other.push("a;shell".into())
            }),
            ("cmdline quote", |p| p.params.other.push("a=\"x".into())),
            ("cmdline non-ascii", |p| p.params.other.push("a=é".into())),
            ("cmdline too long", |p| {
                p.params.other.push("a".repeat(3000))
            }),
            ("api space", |p| p.params.api = Some("http://a b".into())),
            ("api scheme", |p| {
                p.params.api = Some("file:///etc/shadow".into())
            }),
            ("kernel url newline", |p| {
                p.kernel.url = "http://x/k\nshell".into()
            }),
            ("kernel url expansion", |p| {
                p.kernel.url = "http://${x}/k".into()
            }),
            ("kernel url pipe", |p| {
                p.kernel.url = "http://x/k|shell".into()
            }),
            ("kernel url no host", |p| p.kernel.url = "http:///k".into()),
            ("kernel sha", |p| p.kernel.sha256 = "ABC".into()),
            ("initrd sha", |p| {
                p.initrd.as_mut().unwrap().sha256 = hex('G')
            }),
            ("rootfs url", |p| {
                p.rootfs.as_mut().unwrap().artifact.url = "tftp://x/y".into()
            }),
            ("rootfs path", |p| {
                p.rootfs.as_mut().unwrap().path = "/rootfs.img mode=4777".into()
            }),
            ("rootfs path traversal", |p| {
                p.rootfs.as_mut().unwrap().path = "/../x".into()
            }),
            ("rootfs path directory", |p| {
                p.rootfs.as_mut().unwrap().path = "/".into()
            }),
            ("wrapped url", |p| {
                p.rootfs.as_mut().unwrap().wrapped_url = Some("http://x/${y}".into())
            }),
            ("machine name", |p| p.machine = "a\nshell".into()),
            ("image version", |p| p.image_version = "1 || shell".into()),
        ];
        for (name, mutate) in cases {
            let mut p = plan();
            mutate(&mut p);
            let err = render(&p, MAC, "http://10.0.0.1").expect_err(name);
            assert!(
                matches!(err, Error::Unsafe { .. } | Error::Contract(_)),
                "{name}: wrong error {err}"
            );
        }
        assert!(render(&plan(), MAC, "http://10.0.0.1/${x}").is_err());
    }

    #[test]
    fn a_plain_kernel_and_initrd() {
        let mut p = plan();
        p.params = BootParams::parse("console=ttyS0 quiet").unwrap();
        p.params.mac = Some(MAC);
        p.rootfs = None;
        assert_eq!(
            kernel_cmdline(&p).unwrap(),
            "initrd=initrd console=ttyS0 quiet tether.mac=52:54:00:12:34:56"
        );
        let s = render(&p, MAC, "http://10.0.0.1").unwrap();
        assert!(!s.contains("platform") && !s.contains("rootfs"), "{s}");
        p.initrd = None;
        assert_eq!(
            kernel_cmdline(&p).unwrap(),
            "console=ttyS0 quiet tether.mac=52:54:00:12:34:56"
        );
    }

    #[test]
    fn enrollment_urls_are_checked() {
        assert!(Enrollment::new(Some("https://10.0.0.1:9443".into()), None, None).is_ok());
        for bad in ["ftp://x", "http://a b", "http://x/${y}", "http://"] {
            assert!(
                Enrollment::new(Some(bad.into()), None, None).is_err(),
                "{bad}"
            );
        }
    }
}
