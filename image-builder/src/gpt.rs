//! The GPT layout of `disk.raw`: an ESP (systemd-boot, both slots' kernels and initramfs,
//! BLS entries), two rootfs slots (A and B, each a verity-protected rootfs) and a state
//! partition for the persistent `/etc` and `/var` overlays. Every partition starts on a
//! MiB boundary; the layout is pure so it can be table-tested and handed to `sgdisk`.

/// Bytes per logical sector.
pub const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

/// Partition type GUIDs (Discoverable Partitions Specification).
pub mod types {
    /// EFI System Partition.
    pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    /// Linux root (x86-64).
    pub const ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    /// Linux generic data (the state partition).
    pub const LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
}

/// One partition of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// GPT partition name (what `PARTLABEL=` matches).
    pub name: &'static str,
    /// Type GUID.
    pub type_guid: &'static str,
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
}

impl Partition {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        (self.last_lba - self.first_lba + 1) * SECTOR
    }
}

/// A computed disk layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Partitions in table order.
    pub partitions: Vec<Partition>,
    /// Total disk size in bytes (room for the backup GPT included).
    pub disk_size: u64,
}

/// Lays out ESP, slot A, slot B and state; sizes are rounded up to whole MiB. A slot must
/// hold the largest rootfs the machine will ever be upgraded to, so callers pass headroom.
pub fn layout(esp: u64, slot: u64, state: u64) -> Layout {
    let round = |b: u64| b.div_ceil(MIB).max(1) * MIB;
    let mut next = MIB; // after the protective MBR and the primary GPT, aligned
    let mut partitions = Vec::new();
    for (name, type_guid, bytes) in [
        ("esp", types::ESP, round(esp)),
        ("tether-a", types::ROOT_X86_64, round(slot)),
        ("tether-b", types::ROOT_X86_64, round(slot)),
        ("tether-state", types::LINUX_DATA, round(state)),
    ] {
        partitions.push(Partition {
            name,
            type_guid,
            first_lba: next / SECTOR,
            last_lba: (next + bytes) / SECTOR - 1,
        });
        next += bytes;
    }
    // One MiB at the end holds the backup GPT (33 sectors) and keeps the size aligned.
    Layout {
        partitions,
        disk_size: next + MIB,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        // (esp, slot, state, [(first, last) LBA per partition], disk size)
        type Case<'a> = (u64, u64, u64, &'a [(u64, u64)], u64);
        let cases: &[Case] = &[
            // esp 64 MiB, slot 100 MiB, state 32 MiB
            (
                64 * MIB,
                100 * MIB,
                32 * MIB,
                &[
                    (2048, 133119),
                    (133120, 337919),
                    (337920, 542719),
                    (542720, 608255),
                ],
                298 * MIB,
            ),
            // odd sizes round up to whole MiB; zero becomes one MiB
            (
                1,
                MIB + 1,
                0,
                &[(2048, 4095), (4096, 8191), (8192, 12287), (12288, 14335)],
                8 * MIB,
            ),
        ];
        for (esp, slot, state, want, size) in cases {
            let l = layout(*esp, *slot, *state);
            let got: Vec<(u64, u64)> = l
                .partitions
                .iter()
                .map(|p| (p.first_lba, p.last_lba))
                .collect();
            assert_eq!(got, *want);
            assert_eq!(l.disk_size, *size);
            for p in &l.partitions {
                assert_eq!((p.first_lba * SECTOR) % MIB, 0, "{} aligned", p.name);
            }
            for w in l.partitions.windows(2) {
                assert_eq!(w[0].last_lba + 1, w[1].first_lba, "contiguous");
            }
            let last = l.partitions.last().unwrap();
            assert!(
                (last.last_lba + 1) * SECTOR + 33 * SECTOR <= l.disk_size,
                "backup GPT fits"
            );
        }
        let l = layout(64 * MIB, 100 * MIB, 32 * MIB);
        assert_eq!(l.partitions[1].size(), 100 * MIB);
        assert_eq!(
            l.partitions.iter().map(|p| p.name).collect::<Vec<_>>(),
            ["esp", "tether-a", "tether-b", "tether-state"]
        );
    }
}
