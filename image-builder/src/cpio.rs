//! A `newc` cpio writer for the initramfs, built for reproducibility: entries are written in
//! sorted path order with fixed owner (root), fixed mtime and sequential inode numbers, so
//! the archive depends only on the file contents and modes. Parents must be added before
//! children; [`Archive::dir`] entries are emitted as given, which `BTreeMap` keeps sorted.

use std::collections::BTreeMap;

use tether_boot::initrd;

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory with permission bits.
    Dir(u32),
    /// A regular file: permission bits and contents.
    File(u32, Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device: permission bits, major, minor.
    CharDev(u32, u32, u32),
}

/// An in-memory archive keyed by path (no leading `/`).
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds (or replaces) an entry at `path`, creating missing parent directories (0755).
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries
                .entry(parent.clone())
                .or_insert(Entry::Dir(0o755));
        }
        self.entries.insert(path, entry);
    }

    /// Whether `path` is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// Serialises the archive with every mtime set to `mtime`.
    pub fn write(&self, mtime: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir(p) => (0o040000 | p, &[], (0, 0)),
                Entry::File(p, d) => (0o100000 | p, d, (0, 0)),
                Entry::Symlink(t) => (0o120777, t.as_bytes(), (0, 0)),
                Entry::CharDev(p, ma, mi) => (0o020000 | p, &[], (*ma, *mi)),
            };
            let nlink = if matches!(entry, Entry::Dir(_)) { 2 } else { 1 };
            header(
                &mut out,
                ino as u32 + 1,
                mode,
                nlink,
                mtime,
                data.len() as u32,
                rdev,
                path,
            );
            out.extend_from_slice(data);
            pad4(&mut out);
        }
        initrd::write_trailer(&mut out);
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) {
    initrd::write_header(
        out,
        &initrd::Header {
            ino,
            mode,
            nlink,
            mtime,
            size,
            rdev,
            name,
        },
    );
}

fn pad4(out: &mut Vec<u8>) {
    initrd::pad4(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn listing(archive: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio is installed (cargo xtask deps)");
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn parents_are_created_and_sorted() {
        let mut a = Archive::new();
        a.add("/usr/bin/busybox", Entry::File(0o755, b"bb".to_vec()));
        a.add("bin", Entry::Symlink("usr/bin".into()));
        a.add("dev/console", Entry::CharDev(0o600, 5, 1));
        let archive = a.write(1_700_000_000);
        let text = listing(&archive);
        assert!(text.contains("bin -> usr/bin"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("crw-------") && l.ends_with("dev/console")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with("usr/bin/busybox")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("drwxr-xr-x") && l.ends_with(" usr")),
            "{text}"
        );
        let names = names(&archive);
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "dev/console",
                "usr",
                "usr/bin",
                "usr/bin/busybox"
            ]
        );
    }

    fn names(archive: &[u8]) -> Vec<String> {
        let mut child = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn output_is_deterministic_and_aligned() {
        let mut a = Archive::new();
        a.add("b", Entry::File(0o644, b"12345".to_vec()));
        a.add("a", Entry::File(0o644, b"x".to_vec()));
        let one = a.write(7);
        let mut b = Archive::new();
        b.add("a", Entry::File(0o644, b"x".to_vec()));
        b.add("b", Entry::File(0o644, b"12345".to_vec()));
        assert_eq!(one, b.write(7), "insertion order does not matter");
        assert_ne!(one, a.write(8), "mtime is recorded");
        assert_eq!(one.len() % 4, 0);
        assert!(one.starts_with(b"070701"));
        // The first entry is "a": ino 1, mode 0100644, mtime 7, size 1.
        assert_eq!(&one[6..14], b"00000001");
        assert_eq!(&one[14..22], b"000081a4");
        assert_eq!(&one[46..54], b"00000007");
        assert_eq!(&one[54..62], b"00000001");
    }

    #[test]
    fn single_file_archive_round_trips() {
        for body in [&b"abc"[..], b"abcd", b""] {
            let mut out = initrd::entry_header("/rootfs.img", body.len() as u64).unwrap();
            assert_eq!(out.len() % 4, 0);
            out.extend_from_slice(body);
            out.extend(initrd::entry_trailer(body.len() as u64));
            assert_eq!(out.len() % 4, 0);
            let text = listing(&out);
            assert!(
                text.contains(&format!(" {} ", body.len()))
                    && text.trim_end().ends_with("rootfs.img"),
                "{text}"
            );
        }
    }
}
