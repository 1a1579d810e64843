//! How the rootfs reaches a PXE-booted initramfs: as one `newc` cpio entry at the path of
//! `tether.root=file:PATH` ([`crate::cmdline::PXE_ROOTFS_PATH`]), in an initrd that follows
//! the initramfs. The kernel unpacks every concatenated initrd into the same tmpfs, so the
//! initramfs finds the file there.
//!
//! Who writes the entry: iPXE builds it by itself on BIOS (`initrd URL /rootfs.img
//! mode=0400`); Debian's UEFI iPXE does not (its EFI file system hands initrds over raw), so
//! tether-pxe serves the rootfs wrapped ([`entry_header`] + body + [`entry_trailer`]); qemu
//! tests concatenate the same bytes by hand. One writer of the format, here.

use crate::error::{Error, Result};

/// Permission bits of the rootfs entry: read-only, the initramfs only reads it.
pub const ROOTFS_MODE: u32 = 0o400;

/// The `newc` magic.
const MAGIC: &[u8; 6] = b"070701";
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// One `newc` header's fields (the device and checksum fields are always zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    /// Inode number (only needs to be distinct among hard links).
    pub ino: u32,
    /// File type and permission bits (`0o100644`, `0o040755`, …).
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time, Unix seconds.
    pub mtime: u32,
    /// Size of the body that follows.
    pub size: u32,
    /// Device numbers of a device node (major, minor).
    pub rdev: (u32, u32),
    /// The path, without a leading `/`.
    pub name: &'a str,
}

/// Appends `h` (header, name, NUL, zero padding to 4 bytes) to `out`, which must end
/// 4-aligned; the caller appends the body and pads it to 4 bytes.
pub fn write_header(out: &mut Vec<u8>, h: &Header) {
    let fields = [
        h.ino,
        h.mode,
        0, // uid
        0, // gid
        h.nlink,
        h.mtime,
        h.size,
        0, // devmajor
        0, // devminor
        h.rdev.0,
        h.rdev.1,
        h.name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(h.name.as_bytes());
    out.push(0);
    pad4(out);
}

/// Zero bytes up to the next multiple of 4.
pub fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The archive's end: the `TRAILER!!!` entry.
pub fn write_trailer(out: &mut Vec<u8>) {
    write_header(
        out,
        &Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            size: 0,
            rdev: (0, 0),
            name: TRAILER,
        },
    );
}

/// The header of a one-file archive holding `size` bytes at `path` (mode 0400, owner root,
/// mtime 0). The body follows it, then [`entry_trailer`]. A body of 4 GiB or more does not
/// fit the format's 32-bit size field and is refused.
pub fn entry_header(path: &str, size: u64) -> Result<Vec<u8>> {
    let size = u32::try_from(size).map_err(|_| {
        Error::invalid(
            "initrd entry",
            path,
            format!("{size} bytes: a cpio (newc) entry holds less than 4 GiB"),
        )
    })?;
    let mut out = Vec::with_capacity(128);
    write_header(
        &mut out,
        &Header {
            ino: 1,
            mode: 0o100000 | ROOTFS_MODE,
            nlink: 1,
            mtime: 0,
            size,
            rdev: (0, 0),
            name: path.trim_start_matches('/'),
        },
    );
    Ok(out)
}

/// What follows a body of `size` bytes written after [`entry_header`]: its padding and the
/// trailer.
pub fn entry_trailer(size: u64) -> Vec<u8> {
    let mut out = vec![0u8; ((4 - size % 4) % 4) as usize];
    // Built apart so that its own padding is relative to a 4-aligned start.
    let mut trailer = Vec::new();
    write_trailer(&mut trailer);
    out.extend(trailer);
    out
}

/// The length of the whole one-file archive: header + body + padding + trailer.
pub fn entry_len(path: &str, size: u64) -> Result<u64> {
    Ok(entry_header(path, size)?.len() as u64 + size + entry_trailer(size).len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(h: &[u8], i: usize) -> u32 {
        let at = 6 + 8 * i;
        u32::from_str_radix(std::str::from_utf8(&h[at..at + 8]).unwrap(), 16).unwrap()
    }

    #[test]
    fn one_file_archive_layout() {
        for (body, pad) in [(&b"abc"[..], 1), (b"abcd", 0), (b"", 0), (b"abcde", 3)] {
            let h = entry_header("/rootfs.img", body.len() as u64).unwrap();
            assert!(h.starts_with(b"070701"));
            assert_eq!(h.len() % 4, 0);
            assert_eq!(field(&h, 1), 0o100400, "mode");
            assert_eq!(field(&h, 4), 1, "nlink");
            assert_eq!(field(&h, 6), body.len() as u32, "size");
            assert_eq!(field(&h, 11), 11, "namesize: rootfs.img + NUL");
            assert_eq!(&h[110..121], b"rootfs.img\0", "no leading slash");
            let t = entry_trailer(body.len() as u64);
            assert!(t[..pad].iter().all(|b| *b == 0));
            assert_eq!(&t[pad..pad + 6], b"070701");
            assert!(t.windows(11).any(|w| w == b"TRAILER!!!\0"));
            let total = h.len() + body.len() + t.len();
            assert_eq!(total % 4, 0);
            assert_eq!(
                entry_len("/rootfs.img", body.len() as u64).unwrap(),
                total as u64
            );
        }
        let err = entry_header("/rootfs.img", 1 << 32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("less than 4 GiB"), "{err}");
    }
}
