//! iPXE script rendering. Every value that ends up in a script or on a kernel command line is
//! validated against a small allow-list first: an iPXE script is code (`${…}` expands
//! settings, `||`/`&&`/`;` chain commands, whitespace splits arguments), so a label, token
//! or URL pasted raw would let whoever controls it run commands on the booting machine.

use crate::error::{Error, Result};
use tether_boot::Mac;

/// The DHCP user-class our scripts set before any further DHCP, so the server knows the
/// client is an iPXE it already handed a script to and never chainloads it again.
pub const OUR_USER_CLASS: &str = "tether";

/// Linux x86's COMMAND_LINE_SIZE: a longer command line is silently truncated by the kernel.
const MAX_CMDLINE: usize = 2048;
/// Longest URL we put in a script.
const MAX_URL: usize = 2048;

/// One file a script loads, by content hash and the URL it is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRef {
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
    /// Where the machine fetches it (our `/artifacts/sha256/<hex>` or the image's own URL).
    pub url: String,
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
    /// Initrds in order: the initramfs, then the rootfs as a second initrd.
    pub initrds: Vec<ArtifactRef>,
    /// The image's own kernel command line.
    pub cmdline: String,
    /// Per-machine enrollment parameters appended to the command line.
    pub enroll: Enrollment,
}

/// What the node needs to enroll, from configuration: appended to the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enrollment {
    /// The machine API base URL (`tether.api=`).
    pub api_url: Option<String>,
    /// The operator CA pin, `sha256:<hex>` (`tether.ca=`).
    pub ca_pin: Option<String>,
    /// The enrollment token (`tether.token=`).
    pub token: Option<String>,
}

/// Checks a URL we will paste into a script: http(s), bounded, and free of whitespace,
/// quotes, backslashes, `$`, braces, `;`, `|` and control characters.
pub fn check_url(what: &'static str, url: &str) -> Result<()> {
    let unsafe_ = |why| Error::Unsafe {
        what,
        value: url.chars().take(256).collect(),
        why,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(unsafe_("must start with http:// or https://"));
    }
    if url.len() > MAX_URL {
        return Err(unsafe_("too long"));
    }
    let host = url.split("://").nth(1).unwrap_or("");
    if host.is_empty() || host.starts_with('/') {
        return Err(unsafe_("has no host"));
    }
    if let Some(c) = url.chars().find(|c| !is_url_char(*c)) {
        return Err(unsafe_(if c.is_whitespace() {
            "contains whitespace"
        } else if c == '$' || c == '{' || c == '}' {
            "contains an iPXE expansion character"
        } else {
            "contains a character outside the URL allow-list"
        }));
    }
    Ok(())
}

fn is_url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?@!&()*+,=%[]".contains(c)
}

/// Checks one kernel command-line word (`key=value` or a flag).
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

/// Checks an enrollment token: 1–256 characters of `[A-Za-z0-9._-]`.
pub fn check_token(token: &str) -> Result<()> {
    if token.is_empty()
        || token.len() > 256
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(Error::Unsafe {
            what: "enrollment token",
            value: token.chars().take(64).collect(),
            why: "must be 1-256 characters of A-Z a-z 0-9 . _ -",
        });
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

/// Checks a CA pin: `sha256:<64 hex>`, as kubeadm's discovery hash.
pub fn check_ca_pin(pin: &str) -> Result<()> {
    match pin.strip_prefix("sha256:") {
        Some(hex) => check_sha256("CA pin", hex),
        None => Err(Error::Unsafe {
            what: "CA pin",
            value: pin.chars().take(80).collect(),
            why: "must be sha256:<64 hex digits>",
        }),
    }
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

/// The full kernel command line for a plan: the image's words, then `tether.mac=`, then the
/// enrollment parameters, every word validated and the total bounded.
pub fn kernel_cmdline(plan: &BootPlan, mac: Mac, initrd_names: &[&str]) -> Result<String> {
    let mut words: Vec<String> = Vec::new();
    for name in initrd_names {
        words.push(format!("initrd={name}"));
    }
    for w in plan.cmdline.split_ascii_whitespace() {
        check_cmdline_word(w)?;
        words.push(w.to_string());
    }
    if plan
        .cmdline
        .chars()
        .any(|c| c.is_whitespace() && c != ' ' && c != '\t')
    {
        return Err(Error::Unsafe {
            what: "kernel command line",
            value: plan.cmdline.chars().take(256).collect(),
            why: "contains a line break",
        });
    }
    words.push(format!("tether.mac={mac}"));
    if let Some(api) = &plan.enroll.api_url {
        check_url("machine API URL", api)?;
        words.push(format!("tether.api={api}"));
    }
    if let Some(pin) = &plan.enroll.ca_pin {
        check_ca_pin(pin)?;
        words.push(format!("tether.ca={pin}"));
    }
    if let Some(token) = &plan.enroll.token {
        check_token(token)?;
        words.push(format!("tether.token={token}"));
    }
    let line = words.join(" ");
    if line.len() > MAX_CMDLINE {
        return Err(Error::Unsafe {
            what: "kernel command line",
            value: line.chars().take(256).collect(),
            why: "longer than the kernel's 2048-byte limit",
        });
    }
    Ok(line)
}

/// Renders the iPXE script for `mac`. `server` is our own base URL (`http://10.0.0.1:8080`),
/// used for the boot beacon.
pub fn render(plan: &BootPlan, mac: Mac, server: &str) -> Result<String> {
    check_url("server URL", server)?;
    check_label("machine name", &plan.machine)?;
    check_label("image version", &plan.image_version)?;
    check_sha256("kernel sha256", &plan.kernel.sha256)?;
    check_url("kernel URL", &plan.kernel.url)?;
    let mut names = Vec::new();
    for (i, initrd) in plan.initrds.iter().enumerate() {
        check_sha256("initrd sha256", &initrd.sha256)?;
        check_url("initrd URL", &initrd.url)?;
        names.push(if i == 0 {
            "initrd".to_string()
        } else {
            format!("initrd{i}")
        });
    }
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let cmdline = kernel_cmdline(plan, mac, &name_refs)?;
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
    for (initrd, name) in plan.initrds.iter().zip(&names) {
        s.push_str(&format!(
            "initrd --name {name} {} || goto failed\n",
            initrd.url
        ));
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

    fn plan() -> BootPlan {
        BootPlan {
            machine: "mac-525400123456".into(),
            image_version: "2026.11.1".into(),
            kernel: ArtifactRef {
                sha256: hex('a'),
                url: format!("http://10.0.0.1/artifacts/sha256/{}", hex('a')),
            },
            initrds: vec![
                ArtifactRef {
                    sha256: hex('b'),
                    url: format!("http://10.0.0.1/artifacts/sha256/{}", hex('b')),
                },
                ArtifactRef {
                    sha256: hex('c'),
                    url: format!("http://10.0.0.1/artifacts/sha256/{}", hex('c')),
                },
            ],
            cmdline: "console=ttyS0 quiet".into(),
            enroll: Enrollment {
                api_url: Some("https://10.0.0.1:6443".into()),
                ca_pin: Some(format!("sha256:{}", hex('d'))),
                token: Some("abcdef.0123456789abcdef".into()),
            },
        }
    }

    const MAC: Mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    #[test]
    fn renders_full_script() {
        let s = render(&plan(), MAC, "http://10.0.0.1").unwrap();
        let want = format!(
            "#!ipxe\n\
             # tether-pxe: machine mac-525400123456 image 2026.11.1\n\
             set user-class tether\n\
             imgfetch --name beacon http://10.0.0.1/boot/52-54-00-12-34-56/beacon && imgfree beacon || echo tether: boot beacon not delivered\n\
             kernel --name kernel http://10.0.0.1/artifacts/sha256/{a} initrd=initrd initrd=initrd1 console=ttyS0 quiet tether.mac=52:54:00:12:34:56 tether.api=https://10.0.0.1:6443 tether.ca=sha256:{d} tether.token=abcdef.0123456789abcdef || goto failed\n\
             initrd --name initrd http://10.0.0.1/artifacts/sha256/{b} || goto failed\n\
             initrd --name initrd1 http://10.0.0.1/artifacts/sha256/{c} || goto failed\n\
             boot || goto failed\n\
             :failed\necho tether: boot failed, retrying in 10 seconds\nsleep 10\nreboot\n",
            a = hex('a'),
            b = hex('b'),
            d = hex('d'),
            c = hex('c'),
        );
        assert_eq!(s, want);
    }

    #[test]
    fn injection_attempts_are_refused() {
        type Mutate = fn(&mut BootPlan);
        let cases: &[(&str, Mutate)] = &[
            ("cmdline expansion", |p| p.cmdline = "a=${net0/ip}".into()),
            ("cmdline newline", |p| p.cmdline = "a=1\nshell".into()),
            ("cmdline chain", |p| p.cmdline = "a || shell".into()),
            ("cmdline semicolon", |p| p.cmdline = "a;shell".into()),
            ("cmdline quote", |p| p.cmdline = "a=\"x".into()),
            ("cmdline non-ascii", |p| p.cmdline = "a=é".into()),
            ("cmdline too long", |p| p.cmdline = "a".repeat(3000)),
            ("token space", |p| p.enroll.token = Some("a b".into())),
            ("token expansion", |p| p.enroll.token = Some("${x}".into())),
            ("token empty", |p| p.enroll.token = Some(String::new())),
            ("ca pin", |p| p.enroll.ca_pin = Some("md5:abc".into())),
            ("ca pin short", |p| {
                p.enroll.ca_pin = Some("sha256:abc".into())
            }),
            ("api scheme", |p| {
                p.enroll.api_url = Some("file:///etc/shadow".into())
            }),
            ("api space", |p| {
                p.enroll.api_url = Some("http://a b".into())
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
            ("initrd sha", |p| p.initrds[0].sha256 = hex('G')),
            ("initrd url", |p| p.initrds[1].url = "tftp://x/y".into()),
            ("machine name", |p| p.machine = "a\nshell".into()),
            ("image version", |p| p.image_version = "1 || shell".into()),
        ];
        for (name, mutate) in cases {
            let mut p = plan();
            mutate(&mut p);
            let err = render(&p, MAC, "http://10.0.0.1").expect_err(name);
            assert!(
                matches!(err, Error::Unsafe { .. }),
                "{name}: wrong error {err}"
            );
        }
        assert!(render(&plan(), MAC, "http://10.0.0.1/${x}").is_err());
    }

    #[test]
    fn optional_enrollment_is_left_out() {
        let mut p = plan();
        p.enroll = Enrollment::default();
        p.initrds.truncate(1);
        let line = kernel_cmdline(&p, MAC, &["initrd"]).unwrap();
        assert_eq!(
            line,
            "initrd=initrd console=ttyS0 quiet tether.mac=52:54:00:12:34:56"
        );
    }
}
