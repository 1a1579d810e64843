//! A/B slots of a disk install and their systemd-boot entries.
//!
//! Each slot is a GPT partition (`tether-a`, `tether-b`) holding a verity-protected rootfs,
//! plus a kernel and initramfs on the ESP under `tether/<slot>/` and one Boot Loader
//! Specification entry. Boot counting follows systemd-boot: an entry named
//! `NAME+LEFT[-DONE].conf` is tried while LEFT > 0; each try renames it to
//! `+(LEFT-1)-(DONE+1)`, and a good boot (`systemd-bless-boot`, or the agent's health gate)
//! renames it to `NAME.conf`. Freshly written slots get [`BOOT_TRIES`].

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Tries a freshly written slot gets before systemd-boot falls back.
pub const BOOT_TRIES: u32 = 3;

/// The state partition's GPT name, on the kernel command line as `tether.state=PARTLABEL=…`.
pub const STATE_LABEL: &str = "tether-state";

/// An A/B slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// The first slot, installed first.
    A,
    /// The second slot.
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// `a` or `b`: the form on the command line (`tether.slot=`) and in Machine status.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot: where an upgrade writes.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The slot's GPT partition name (`tether-a`).
    pub fn partition_label(self) -> String {
        format!("tether-{}", self.name())
    }

    /// The slot's directory on the ESP (`tether/a`), holding `vmlinuz` and `initramfs`.
    pub fn esp_dir(self) -> String {
        format!("tether/{}", self.name())
    }

    /// The BLS entry file name with `tries` left (`tether-a+3.conf`), or blessed
    /// (`tether-a.conf`).
    pub fn entry_file_name(self, tries: Option<u32>) -> String {
        match tries {
            Some(n) => format!("tether-{}+{n}.conf", self.name()),
            None => format!("tether-{}.conf", self.name()),
        }
    }

    /// A Boot Loader Specification type #1 entry (paths relative to the ESP); `cmdline` is
    /// the slot's whole command line, `tether.slot=` included.
    pub fn bls_entry(self, version: &str, cmdline: &str) -> String {
        let s = self.name();
        let dir = self.esp_dir();
        format!(
            "title Tether {version} (slot {s})\nversion {version}\nsort-key tether-{s}\nlinux /{dir}/vmlinuz\ninitrd /{dir}/initramfs\noptions {cmdline}\n"
        )
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Slot {
    type Err = Error;

    fn from_str(s: &str) -> Result<Slot, Error> {
        match s {
            "a" => Ok(Slot::A),
            "b" => Ok(Slot::B),
            _ => Err(Error::invalid("boot slot", s, "must be a or b")),
        }
    }
}

/// systemd-boot's `loader/loader.conf`: slot A first, no menu delay.
pub fn loader_conf() -> String {
    "default tether-a*\ntimeout 0\nconsole-mode keep\neditor no\n".into()
}

/// Splits a BLS entry file name into its base and boot counters (left, done).
pub fn parse_entry_counter(file: &str) -> Option<(&str, Option<(u32, u32)>)> {
    let stem = file.strip_suffix(".conf")?;
    let Some((base, counter)) = stem.rsplit_once('+') else {
        return Some((stem, None));
    };
    let (left, done) = match counter.split_once('-') {
        Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
        None => (counter.parse().ok()?, 0),
    };
    Some((base, Some((left, done))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(Slot::A.entry_file_name(Some(BOOT_TRIES)), "tether-a+3.conf");
        assert_eq!(Slot::B.entry_file_name(None), "tether-b.conf");
        assert_eq!(Slot::A.partition_label(), "tether-a");
        assert_eq!(Slot::B.esp_dir(), "tether/b");
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!("b".parse::<Slot>().unwrap(), Slot::B);
        for bad in ["", "A", "c", "a "] {
            assert!(bad.parse::<Slot>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn entry_counters() {
        type Parsed<'a> = Option<(&'a str, Option<(u32, u32)>)>;
        let cases: &[(&str, Parsed)] = &[
            ("tether-a+3.conf", Some(("tether-a", Some((3, 0))))),
            ("tether-a+2-1.conf", Some(("tether-a", Some((2, 1))))),
            ("tether-a+0-3.conf", Some(("tether-a", Some((0, 3))))),
            ("tether-b.conf", Some(("tether-b", None))),
            ("tether-a+x.conf", None),
            ("tether-a+3", None),
        ];
        for (file, want) in cases {
            assert_eq!(parse_entry_counter(file), *want, "{file}");
        }
    }

    #[test]
    fn bls_entry_renders() {
        let e = Slot::B.bls_entry("1.2", "console=ttyS0 tether.slot=b");
        assert_eq!(
            e,
            "title Tether 1.2 (slot b)\nversion 1.2\nsort-key tether-b\nlinux /tether/b/vmlinuz\ninitrd /tether/b/initramfs\noptions console=ttyS0 tether.slot=b\n"
        );
        assert!(loader_conf().starts_with("default tether-a*\n"));
    }
}
