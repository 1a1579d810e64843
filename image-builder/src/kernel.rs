//! `vmlinux` from `vmlinuz`: the logic of the kernel's `scripts/extract-vmlinux`. A bzImage
//! holds the real kernel as one compressed payload; we look for each known compression
//! magic, hand the bytes from there to the matching decompressor and keep the first output
//! that is an ELF file. qemu boots an uncompressed ELF `vmlinux` directly (PVH entry), which
//! skips the decompression that costs seconds under TCG.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// A compression the kernel's boot wrapper may use, with the tool that undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// gzip (`1f 8b 08`).
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`), Debian's choice.
    Xz,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Codec {
    fn magic(self) -> &'static [u8] {
        match self {
            Codec::Gzip => &[0x1f, 0x8b, 0x08],
            Codec::Xz => &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00],
            Codec::Zstd => &[0x28, 0xb5, 0x2f, 0xfd],
        }
    }

    fn tool(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Xz => "xz",
            Codec::Zstd => "zstd",
        }
    }
}

/// Every offset where a compression magic starts, in file order.
pub fn candidates(data: &[u8]) -> Vec<(usize, Codec)> {
    let mut out = Vec::new();
    for i in 0..data.len() {
        for codec in [Codec::Xz, Codec::Zstd, Codec::Gzip] {
            if data[i..].starts_with(codec.magic()) {
                out.push((i, codec));
            }
        }
    }
    out
}

/// Whether `data` starts like an ELF file.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

/// Decompresses the payload of the kernel image at `path`.
pub fn extract_vmlinux(path: &Path) -> Result<Vec<u8>> {
    let data = std::fs::read(path).map_err(Error::io("read", path))?;
    let found = candidates(&data);
    if found.is_empty() {
        return Err(Error::Kernel {
            path: path.to_path_buf(),
            reason: "no gzip, xz or zstd magic".into(),
        });
    }
    for (offset, codec) in found.iter().take(16) {
        // Decompressors complain about the trailing bytes after the payload; the ELF check
        // decides, not their exit status.
        if let Ok(out) = decompress(codec.tool(), &data[*offset..])
            && is_elf(&out)
        {
            return Ok(out);
        }
    }
    Err(Error::Kernel {
        path: path.to_path_buf(),
        reason: format!(
            "none of {} payload candidates decompressed to ELF",
            found.len()
        ),
    })
}

fn decompress(tool: &str, input: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = Vec::new();
    child.stdout.take().expect("piped").read_to_end(&mut out)?;
    let _ = child.wait();
    let _ = writer.join();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(tool: &str, data: &[u8]) -> Vec<u8> {
        let mut child = Command::new(tool)
            .args(["-c", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(data).unwrap();
        child.wait_with_output().unwrap().stdout
    }

    #[test]
    fn finds_magics() {
        let data = [
            0u8, 0x1f, 0x8b, 0x08, 0, 0x28, 0xb5, 0x2f, 0xfd, 0xfd, 0x37, 0x7a, 0x58, 0x5a, 0,
        ];
        assert_eq!(
            candidates(&data),
            [(1, Codec::Gzip), (5, Codec::Zstd), (9, Codec::Xz)]
        );
        assert!(candidates(b"plain").is_empty());
    }

    #[test]
    fn extracts_elf_payload_behind_a_decoy_for_each_codec() {
        let elf: Vec<u8> = b"\x7fELF"
            .iter()
            .copied()
            .chain((0..5000u32).map(|i| (i % 251) as u8))
            .collect();
        for tool in ["gzip", "xz", "zstd"] {
            let dir = tempfile::tempdir().unwrap();
            // A "setup header", a decoy payload that is not ELF, the real one, trailing junk.
            let mut image = b"MZ boot sector".to_vec();
            image.extend(compress(tool, b"not a kernel"));
            image.extend(compress(tool, &elf));
            image.extend(b"trailer");
            let path = dir.path().join("vmlinuz");
            std::fs::write(&path, &image).unwrap();
            assert_eq!(extract_vmlinux(&path).unwrap(), elf, "{tool}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinuz");
        std::fs::write(&path, b"nothing here").unwrap();
        let err = extract_vmlinux(&path).unwrap_err().to_string();
        assert!(err.contains("no gzip, xz or zstd magic"), "{err}");
        std::fs::write(&path, compress("gzip", b"no elf")).unwrap();
        let err = extract_vmlinux(&path).unwrap_err().to_string();
        assert!(err.contains("decompressed to ELF"), "{err}");
    }
}
