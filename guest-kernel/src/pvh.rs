//! The PVH boot ABI: `hvm_start_info` and its memory map (Xen public header
//! `arch/x86/hvm/start_info.h`, version 1). The VMM leaves the physical address
//! of the start-info block in EBX at the 32-bit entry point.

/// `hvm_start_info.magic`: "xEn3" with the top bit of the last byte flipped.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;

/// `struct hvm_start_info` (version 1 layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

/// `struct hvm_memmap_table_entry`: E820-style.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// E820 type of usable RAM (ACPI 6.5 §15.1, table 15.1: `AddressRangeMemory`).
pub const E820_RAM: u32 = 1;

/// Why a start-info block was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    BadMagic(u32),
    /// Version 0 has no memory map; this kernel needs one.
    NoMemmap,
}

impl StartInfo {
    pub fn validate(&self) -> Result<(), StartInfoError> {
        if self.magic != START_INFO_MAGIC {
            return Err(StartInfoError::BadMagic(self.magic));
        }
        if self.version < 1 || self.memmap_paddr == 0 || self.memmap_entries == 0 {
            return Err(StartInfoError::NoMemmap);
        }
        Ok(())
    }
}

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
}

impl PhysRange {
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// RAM entries [`usable_ranges`] sorts at most (the rest count as dropped).
const MAX_RAM_ENTRIES: usize = 64;

/// The page-aligned parts of the RAM entries that fall inside `[lo, hi)`, in
/// address order, with overlaps merged. At most `N` ranges are kept (later ones
/// are dropped and counted in the second return value). Fixed capacity: the
/// kernel has no heap yet when it needs this.
#[must_use]
pub fn usable_ranges<const N: usize>(
    entries: &[MemmapEntry],
    lo: u64,
    hi: u64,
) -> (heapless::Vec<PhysRange, N>, usize) {
    let mut out = heapless::Vec::<PhysRange, N>::new();
    let mut dropped = 0;
    let mut clipped = heapless::Vec::<PhysRange, MAX_RAM_ENTRIES>::new();
    for e in entries.iter().filter(|e| e.kind == E820_RAM) {
        let start = e.addr.max(lo).saturating_add(0xFFF) & !0xFFF;
        let end = e.addr.saturating_add(e.size).min(hi) & !0xFFF;
        if end > start && clipped.push(PhysRange { start, end }).is_err() {
            dropped += 1;
        }
    }
    clipped.sort_unstable_by_key(|r| r.start);
    for r in &clipped {
        if let Some(last) = out.last_mut()
            && r.start <= last.end
        {
            last.end = last.end.max(r.end);
            continue;
        }
        if out.push(*r).is_err() {
            dropped += 1;
        }
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(addr: u64, size: u64) -> MemmapEntry {
        MemmapEntry {
            addr,
            size,
            kind: E820_RAM,
            reserved: 0,
        }
    }

    #[test]
    fn validates_magic_and_version() {
        let mut si = StartInfo {
            magic: START_INFO_MAGIC,
            version: 1,
            memmap_paddr: 0x7000,
            memmap_entries: 3,
            ..Default::default()
        };
        assert_eq!(si.validate(), Ok(()));
        si.version = 0;
        assert_eq!(si.validate(), Err(StartInfoError::NoMemmap));
        si.magic = 0xdead_beef;
        assert_eq!(si.validate(), Err(StartInfoError::BadMagic(0xdead_beef)));
    }

    #[test]
    fn clips_aligns_merges_and_skips_reserved() {
        let entries = [
            ram(0, 0x9_fc00), // below lo: dropped
            MemmapEntry {
                addr: 0xf_0000,
                size: 0x1_0000,
                kind: 2,
                reserved: 0,
            },
            ram(0x10_0000, 0x7ef_0000), // 1 MiB .. 127 MiB
            ram(0x7ff_0000, 0x10_0123), // touches the previous one: merged, end rounded down
            ram(0xC000_0000, 0x1000),   // above hi: dropped
        ];
        let (r, dropped) = usable_ranges::<8>(&entries, 0x40_0123, 0xB000_0000);
        assert_eq!(dropped, 0);
        assert_eq!(
            r.as_slice(),
            &[PhysRange {
                start: 0x40_1000,
                end: 0x80f_0000
            }]
        );
    }

    #[test]
    fn unsorted_input_is_sorted_and_capacity_is_reported() {
        let entries = [
            ram(0x300_0000, 0x1000),
            ram(0x100_0000, 0x1000),
            ram(0x200_0000, 0x1000),
        ];
        let (r, dropped) = usable_ranges::<2>(&entries, 0, u64::MAX);
        assert_eq!(r.as_slice().len(), 2);
        assert_eq!(r.as_slice()[0].start, 0x100_0000);
        assert_eq!(dropped, 1);
    }
}
