//! A ring-3-readable copy of what the VMM handed over at boot.
//!
//! The VMM may place `hvm_start_info`, the memory map and the command line
//! anywhere in low memory — QEMU's PVH ROM uses page 0, which ring 3 must not
//! see (it is the null-pointer guard). Ring 0 copies them here once, bounded.

use crate::pvh::{MemmapEntry, StartInfo};

/// Most memory-map entries kept.
pub const MAX_MEMMAP: usize = 128;
/// Longest command line kept (bytes, without the NUL).
pub const MAX_CMDLINE: usize = 2047;

/// The copy. Written by ring 0 before ring 3 first runs; read-only afterwards.
/// Plain arrays with a length rather than `heapless` vectors: the copy loops
/// run in ring 0, where a capacity check per pushed byte is one more emulated
/// instruction each.
#[repr(C)]
pub struct BootBlob {
    pub start_info: StartInfo,
    pub memmap: [MemmapEntry; MAX_MEMMAP],
    pub memmap_len: usize,
    pub cmdline: [u8; MAX_CMDLINE],
    pub cmdline_len: usize,
}

static mut BLOB: BootBlob = BootBlob {
    start_info: StartInfo {
        magic: 0,
        version: 0,
        flags: 0,
        nr_modules: 0,
        modlist_paddr: 0,
        cmdline_paddr: 0,
        rsdp_paddr: 0,
        memmap_paddr: 0,
        memmap_entries: 0,
        reserved: 0,
    },
    memmap: [MemmapEntry {
        addr: 0,
        size: 0,
        kind: 0,
        reserved: 0,
    }; MAX_MEMMAP],
    memmap_len: 0,
    cmdline: [0; MAX_CMDLINE],
    cmdline_len: 0,
};

/// Below this, everything the boot protocol points at is mapped (identity map of 4 GiB).
const MAPPED_END: u64 = para_abi::layout::IDENTITY_MAP_END;

fn mapped(addr: u64, len: u64) -> bool {
    addr.checked_add(len).is_some_and(|end| end <= MAPPED_END)
}

/// Copies the start-info block, its memory map and the command line.
///
/// # Safety
/// Ring 0, once, on the boot CPU before ring 3 runs.
pub unsafe fn capture(start_info: u64) {
    // SAFETY: single-threaded boot; nothing else references BLOB yet.
    let blob = unsafe { &mut *core::ptr::addr_of_mut!(BLOB) };
    if !mapped(start_info, core::mem::size_of::<StartInfo>() as u64) {
        return;
    }
    // SAFETY: mapped (checked); the VMM wrote it before entry.
    blob.start_info = unsafe { core::ptr::read_unaligned(start_info as *const StartInfo) };
    let si = &blob.start_info;
    let n = (si.memmap_entries as usize).min(MAX_MEMMAP);
    if mapped(
        si.memmap_paddr,
        (n * core::mem::size_of::<MemmapEntry>()) as u64,
    ) {
        for (i, slot) in blob.memmap[..n].iter_mut().enumerate() {
            // SAFETY: within the mapped, checked range.
            *slot = unsafe {
                core::ptr::read_unaligned((si.memmap_paddr as *const MemmapEntry).add(i))
            };
        }
        blob.memmap_len = n;
    }
    if si.cmdline_paddr != 0 && mapped(si.cmdline_paddr, MAX_CMDLINE as u64) {
        let src = si.cmdline_paddr as *const u8;
        let mut len = 0;
        while len < MAX_CMDLINE {
            // SAFETY: within the mapped, checked range.
            let b = unsafe { src.add(len).read() };
            if b == 0 {
                break;
            }
            blob.cmdline[len] = b;
            len += 1;
        }
        blob.cmdline_len = len;
    }
}

/// The copy, for ring 3.
#[must_use]
pub fn get() -> &'static BootBlob {
    // SAFETY: written once before ring 3 started, never again.
    unsafe { &*core::ptr::addr_of!(BLOB) }
}

impl BootBlob {
    #[must_use]
    pub fn memmap(&self) -> &[MemmapEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// The command line; empty when absent or not UTF-8.
    #[must_use]
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}
