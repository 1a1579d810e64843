//! The `tether.*` kernel command line: one type, [`BootParams`], that tether-image and
//! tether-pxe render and the initramfs and tether-agent read.
//!
//! | key | value | written by | read by |
//! |---|---|---|---|
//! | `tether.root` | `file:/rootfs.img` (PXE: the rootfs unpacked from a second initrd) or `PARTLABEL=tether-a` | tether-image | initramfs |
//! | `tether.rootfstype` | `squashfs` or `erofs` | tether-image | initramfs |
//! | `tether.verity.roothash`, `tether.verity.hashoffset` | dm-verity root hash (hex), hash tree offset | tether-image | initramfs |
//! | `tether.state` | `PARTLABEL=tether-state` | tether-image (disk) | initramfs, agent |
//! | `tether.slot` | `a` or `b` | tether-image (disk entries) | agent |
//! | `tether.mac` | the MAC the machine booted from | tether-pxe | agent |
//! | `tether.api`, `tether.ca`, `tether.token` | machine API URL, CA pin, enrollment token | tether-pxe | agent |
//! | `ds` | `nocloud;s=<seed URI>/` (cloud-init's NoCloud) | the user | agent |
//!
//! Words that are not ours are kept, in order, and rendered first. A known key given twice,
//! or with a value that does not parse, is an error: the line decides what a machine trusts,
//! so an ambiguous one is refused rather than guessed at. The initramfs script
//! (`image-builder/src/initramfs/init.sh`) reads the image keys by these exact names; a test
//! in tether-image keeps the two in step.

use crate::error::{Error, Result};
use crate::mac::Mac;
use crate::pin::CaPin;
use crate::seed::NoCloudSource;
use crate::slot::{STATE_LABEL, Slot};
use crate::token::Token;

/// `tether.root=`
pub const ROOT: &str = "tether.root";
/// `tether.rootfstype=`
pub const ROOTFS_TYPE: &str = "tether.rootfstype";
/// `tether.verity.roothash=`
pub const VERITY_ROOT_HASH: &str = "tether.verity.roothash";
/// `tether.verity.hashoffset=`
pub const VERITY_HASH_OFFSET: &str = "tether.verity.hashoffset";
/// `tether.state=`
pub const STATE: &str = "tether.state";
/// `tether.slot=`
pub const SLOT: &str = "tether.slot";
/// `tether.mac=`
pub const MAC: &str = "tether.mac";
/// `tether.api=`
pub const API: &str = "tether.api";
/// `tether.ca=`
pub const CA: &str = "tether.ca";
/// `tether.token=`
pub const TOKEN: &str = "tether.token";
/// cloud-init's datasource word, `ds=nocloud;s=<uri>/`.
pub const DS: &str = "ds";

/// The keys the initramfs reads, in the order [`BootParams::render`] writes them.
pub const INITRAMFS_KEYS: &[&str] = &[
    ROOT,
    ROOTFS_TYPE,
    VERITY_ROOT_HASH,
    VERITY_HASH_OFFSET,
    STATE,
];

/// Where a PXE-booted initramfs finds the rootfs: the file the second initrd unpacks to.
pub const PXE_ROOTFS_PATH: &str = "/rootfs.img";

/// Longest URL accepted anywhere on a command line or in a boot script.
pub const MAX_URL: usize = 2048;

/// Linux x86's COMMAND_LINE_SIZE: a longer command line is silently truncated by the kernel.
pub const MAX_CMDLINE: usize = 2048;

/// Where the initramfs finds the rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// A file inside the initramfs (`file:/rootfs.img`).
    File(String),
    /// A GPT partition by name (`PARTLABEL=tether-a`).
    PartLabel(String),
}

impl Root {
    /// The rootfs of a PXE boot: [`PXE_ROOTFS_PATH`].
    pub fn pxe() -> Root {
        Root::File(PXE_ROOTFS_PATH.into())
    }

    fn parse(key: &'static str, value: &str) -> Result<Root> {
        let root = if let Some(path) = value.strip_prefix("file:") {
            Root::File(path.into())
        } else if let Some(label) = value.strip_prefix("PARTLABEL=") {
            Root::PartLabel(label.into())
        } else {
            return Err(Error::invalid(
                key,
                value,
                "must be file:PATH or PARTLABEL=NAME",
            ));
        };
        root.check(key)?;
        Ok(root)
    }

    fn check(&self, key: &'static str) -> Result<()> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
                && !s.split('/').any(|part| part == "..")
        };
        match self {
            Root::File(p) if p.starts_with('/') && ok(p) => Ok(()),
            Root::PartLabel(l) if ok(l) && !l.contains('/') => Ok(()),
            other => Err(Error::invalid(
                key,
                &other.render(),
                "path or label must be 1-128 characters of A-Z a-z 0-9 . _ - (/ in absolute paths, no ..)",
            )),
        }
    }

    fn render(&self) -> String {
        match self {
            Root::File(p) => format!("file:{p}"),
            Root::PartLabel(l) => format!("PARTLABEL={l}"),
        }
    }
}

/// dm-verity parameters of the rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Root hash, lower-case hex.
    pub root_hash: String,
    /// Offset of the hash tree in the rootfs device.
    pub hash_offset: u64,
}

/// The parsed (or to-be-rendered) kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootParams {
    /// Words that are not ours (`console=ttyS0`, `panic=10`, …), in order.
    pub other: Vec<String>,
    /// Where the rootfs is.
    pub root: Option<Root>,
    /// `squashfs` or `erofs`.
    pub rootfs_type: Option<String>,
    /// dm-verity root hash and hash offset.
    pub verity: Option<VerityParams>,
    /// The persistent state partition (disk installs).
    pub state: Option<Root>,
    /// The A/B slot this entry boots (disk installs).
    pub slot: Option<Slot>,
    /// The MAC the machine PXE-booted from.
    pub mac: Option<Mac>,
    /// The machine API base URL.
    pub api: Option<String>,
    /// The machine API's CA pin.
    pub ca: Option<CaPin>,
    /// The enrollment token.
    pub token: Option<Token>,
    /// cloud-init NoCloud datasource (`ds=nocloud;s=…`).
    pub nocloud: Option<NoCloudSource>,
}

impl BootParams {
    /// Parses a command line (`/proc/cmdline`, a BootImage's `cmdline`). Double quotes
    /// group a value with spaces, as the kernel does.
    pub fn parse(line: &str) -> Result<BootParams> {
        let mut p = BootParams::default();
        let mut verity_hash: Option<String> = None;
        let mut verity_offset: Option<u64> = None;
        let mut seen: Vec<&'static str> = Vec::new();
        for word in split_words(line) {
            // `"key=value"` (a whole word quoted, as GRUB configs write `ds=…;…`).
            let word = unquote(&word).to_string();
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, unquote(v)),
                None => (word.as_str(), ""),
            };
            let Some(known) = known_key(key) else {
                p.other.push(word.clone());
                continue;
            };
            if seen.contains(&known) {
                // Never echo a token's value (it is logged, and shown on consoles).
                let shown = if known == TOKEN { "<redacted>" } else { value };
                return Err(Error::invalid(
                    known,
                    shown,
                    "given twice on the command line",
                ));
            }
            seen.push(known);
            match known {
                ROOT => p.root = Some(Root::parse(ROOT, value)?),
                ROOTFS_TYPE => p.rootfs_type = Some(check_rootfs_type(value)?.to_string()),
                VERITY_ROOT_HASH => verity_hash = Some(check_root_hash(value)?.to_string()),
                VERITY_HASH_OFFSET => {
                    verity_offset = Some(value.parse().map_err(|_| {
                        Error::invalid(VERITY_HASH_OFFSET, value, "must be a byte offset")
                    })?)
                }
                STATE => p.state = Some(check_state(Root::parse(STATE, value)?)?),
                SLOT => p.slot = Some(value.parse()?),
                MAC => p.mac = Some(value.parse()?),
                API => p.api = Some(check_url(API, value)?.to_string()),
                CA => p.ca = Some(value.parse()?),
                TOKEN => p.token = Some(value.parse()?),
                DS => match NoCloudSource::parse(value)? {
                    Some(ds) => p.nocloud = Some(ds),
                    // Another datasource (`ds=ec2`): not ours to judge.
                    None => p.other.push(word.clone()),
                },
                _ => unreachable!("known_key returns only the keys matched here"),
            }
        }
        p.verity = match (verity_hash, verity_offset) {
            (Some(root_hash), Some(hash_offset)) => Some(VerityParams {
                root_hash,
                hash_offset,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::invalid(
                    VERITY_ROOT_HASH,
                    line,
                    "tether.verity.roothash and tether.verity.hashoffset come together",
                ));
            }
        };
        Ok(p)
    }

    /// Renders the line: other words first, then ours in a fixed order. Every value is
    /// checked again, so a hand-built `BootParams` cannot render something `parse` refuses.
    pub fn render(&self) -> Result<String> {
        let mut words: Vec<String> = self.other.clone();
        let mut push = |k: &str, v: String| words.push(format!("{k}={v}"));
        if let Some(r) = &self.root {
            r.check(ROOT)?;
            push(ROOT, r.render());
        }
        if let Some(t) = &self.rootfs_type {
            push(ROOTFS_TYPE, check_rootfs_type(t)?.to_string());
        }
        if let Some(v) = &self.verity {
            push(VERITY_ROOT_HASH, check_root_hash(&v.root_hash)?.to_string());
            push(VERITY_HASH_OFFSET, v.hash_offset.to_string());
        }
        if let Some(s) = &self.state {
            push(STATE, check_state(s.clone())?.render());
        }
        if let Some(s) = self.slot {
            push(SLOT, s.to_string());
        }
        if let Some(m) = self.mac {
            push(MAC, m.to_string());
        }
        if let Some(a) = &self.api {
            push(API, check_url(API, a)?.to_string());
        }
        if let Some(c) = &self.ca {
            push(CA, c.to_string());
        }
        if let Some(t) = &self.token {
            push(TOKEN, t.to_string());
        }
        if let Some(ds) = &self.nocloud {
            push(DS, ds.render());
        }
        let line = words.join(" ");
        if line.len() > MAX_CMDLINE {
            return Err(Error::invalid(
                "kernel command line",
                &line,
                format!(
                    "{} bytes, longer than the kernel's {MAX_CMDLINE}",
                    line.len()
                ),
            ));
        }
        Ok(line)
    }

    /// `tether.*` words this version does not know (a typo, or a newer writer): for a
    /// warning in the reader's log.
    pub fn unknown_tether_words(&self) -> Vec<&str> {
        self.other
            .iter()
            .filter(|w| w.starts_with("tether."))
            .map(String::as_str)
            .collect()
    }
}

fn known_key(key: &str) -> Option<&'static str> {
    [
        ROOT,
        ROOTFS_TYPE,
        VERITY_ROOT_HASH,
        VERITY_HASH_OFFSET,
        STATE,
        SLOT,
        MAC,
        API,
        CA,
        TOKEN,
        DS,
    ]
    .into_iter()
    .find(|k| *k == key)
}

/// Splits on ASCII whitespace outside double quotes (the kernel's own rule).
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_ascii_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

fn check_rootfs_type(t: &str) -> Result<&str> {
    match t {
        "squashfs" | "erofs" => Ok(t),
        _ => Err(Error::invalid(ROOTFS_TYPE, t, "must be squashfs or erofs")),
    }
}

fn check_root_hash(h: &str) -> Result<&str> {
    if (32..=128).contains(&h.len())
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(h)
    } else {
        Err(Error::invalid(
            VERITY_ROOT_HASH,
            h,
            "must be 32-128 lower-case hex digits",
        ))
    }
}

fn check_state(r: Root) -> Result<Root> {
    match r {
        Root::PartLabel(_) => Ok(r),
        Root::File(_) => Err(Error::invalid(
            STATE,
            &r.render(),
            format!("must be PARTLABEL=NAME (the image writes PARTLABEL={STATE_LABEL})"),
        )),
    }
}

/// Checks a URL that goes on a kernel command line or into a boot script: `http(s)://`,
/// a host, at most [`MAX_URL`] bytes, and only characters that neither a shell, iPXE nor
/// the kernel treat specially (no whitespace, quotes, backslashes, `$`, braces, `;`, `|`,
/// `#` or control characters).
pub fn check_url<'a>(what: &'static str, url: &'a str) -> Result<&'a str> {
    let bad = |why: &str| Error::invalid(what, url, why);
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| bad("must start with http:// or https://"))?;
    if url.len() > MAX_URL {
        return Err(bad("too long"));
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("has no host"));
    }
    if let Some(c) = url.chars().find(|c| !is_url_char(*c)) {
        return Err(bad(if c.is_whitespace() {
            "contains whitespace"
        } else if c == '$' || c == '{' || c == '}' {
            "contains an iPXE expansion character"
        } else {
            "contains a character outside the URL allow-list"
        }));
    }
    Ok(url)
}

fn is_url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?@!&()*+,=%[]".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn full() -> BootParams {
        BootParams {
            other: vec!["console=ttyS0".into(), "panic=10".into()],
            root: Some(Root::pxe()),
            rootfs_type: Some("squashfs".into()),
            verity: Some(VerityParams {
                root_hash: HASH.into(),
                hash_offset: 4096,
            }),
            state: None,
            slot: None,
            mac: Some("52:54:00:12:34:56".parse().unwrap()),
            api: Some("https://10.0.0.1:9443".into()),
            ca: Some(format!("sha256:{HASH}").parse().unwrap()),
            token: Some("abcdef.0123456789abcdef".parse().unwrap()),
            nocloud: None,
        }
    }

    #[test]
    fn renders_in_a_fixed_order_and_parses_back() {
        let line = full().render().unwrap();
        assert_eq!(
            line,
            format!(
                "console=ttyS0 panic=10 tether.root=file:/rootfs.img tether.rootfstype=squashfs \
                 tether.verity.roothash={HASH} tether.verity.hashoffset=4096 \
                 tether.mac=52:54:00:12:34:56 tether.api=https://10.0.0.1:9443 \
                 tether.ca=sha256:{HASH} tether.token=abcdef.0123456789abcdef"
            )
        );
        assert_eq!(BootParams::parse(&line).unwrap(), full());
        assert_eq!(BootParams::parse("").unwrap(), BootParams::default());
    }

    #[test]
    fn disk_entries_and_nocloud() {
        let line = format!(
            "quiet tether.root=PARTLABEL=tether-b tether.rootfstype=erofs \
             tether.verity.roothash={HASH} tether.verity.hashoffset=1 \
             tether.state=PARTLABEL=tether-state tether.slot=b \
             \"ds=nocloud;s=http://10.0.0.1:8000/seed/\"\n"
        );
        let p = BootParams::parse(&line).unwrap();
        assert_eq!(p.root, Some(Root::PartLabel("tether-b".into())));
        assert_eq!(p.state, Some(Root::PartLabel("tether-state".into())));
        assert_eq!(p.slot, Some(Slot::B));
        assert_eq!(
            p.nocloud.as_ref().and_then(|n| n.seed.as_deref()),
            Some("http://10.0.0.1:8000/seed/")
        );
        assert_eq!(p.other, vec!["quiet"]);
        assert_eq!(BootParams::parse(&p.render().unwrap()).unwrap(), p);
        // Another cloud-init datasource is left alone.
        let p = BootParams::parse("ds=ec2").unwrap();
        assert_eq!((p.nocloud, p.other), (None, vec!["ds=ec2".to_string()]));
    }

    #[test]
    fn refusals() {
        let cases: &[(&str, &str)] = &[
            ("tether.root=/rootfs.img", "file:PATH or PARTLABEL"),
            ("tether.root=file:rootfs.img", "path or label"),
            ("tether.root=file:/../etc/shadow", "path or label"),
            ("tether.root=PARTLABEL=a/b", "path or label"),
            ("tether.rootfstype=ext4", "squashfs or erofs"),
            (
                "tether.verity.roothash=XYZ tether.verity.hashoffset=1",
                "hex",
            ),
            ("tether.verity.hashoffset=-1", "byte offset"),
            (&format!("tether.verity.roothash={HASH}"), "come together"),
            ("tether.state=file:/x", "PARTLABEL"),
            ("tether.slot=c", "a or b"),
            ("tether.mac=nope", "MAC"),
            ("tether.api=ftp://x", "http://"),
            ("tether.api=http://a$b", "expansion"),
            ("tether.api=\"http://a b\"", "whitespace"),
            ("tether.ca=md5:1", "sha256"),
            ("tether.token=abc", "<id>.<secret>"),
            ("tether.slot=a tether.slot=b", "twice"),
            ("tether.api=http://a tether.api=http://b", "twice"),
            (
                "tether.token=abcdef.zyxwvutsrqponmlk tether.token=abcdef.zyxwvutsrqponmlk",
                "<redacted>",
            ),
        ];
        for (line, want) in cases {
            let err = BootParams::parse(line).expect_err(line).to_string();
            assert!(err.contains(want), "{line}: {err} lacks {want}");
            assert!(
                !err.contains("zyxwvutsrqponmlk"),
                "{err} shows a token's secret"
            );
        }
        let mut p = full();
        p.other.push("x".repeat(MAX_CMDLINE));
        assert!(p.render().unwrap_err().to_string().contains("longer than"));
        let mut p = full();
        p.api = Some("http://a b".into());
        assert!(p.render().is_err(), "render checks values too");
    }

    #[test]
    fn unknown_tether_words_are_kept_for_a_warning() {
        let p = BootParams::parse("tether.tokn=x console=tty0").unwrap();
        assert_eq!(p.unknown_tether_words(), vec!["tether.tokn=x"]);
    }

    #[test]
    fn urls() {
        for ok in [
            "http://10.0.0.1",
            "https://h:1/a/b?c=d&e=%20",
            "http://[fe80::1]:80/",
        ] {
            assert!(check_url("u", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "http://",
            "http:///x",
            "file:///etc",
            "http://a\nb",
            "http://a|b",
            "http://a#b",
            "http://a\"b",
        ] {
            assert!(check_url("u", bad).is_err(), "{bad:?}");
        }
        assert!(check_url("u", &format!("http://a/{}", "x".repeat(MAX_URL))).is_err());
    }
}
