//! Loading a PVH guest image and building its boot information.
//!
//! The PVH boot ABI (Xen `docs/misc/pvh.pandoc`): the VMM enters the image's
//! `XEN_ELFNOTE_PHYS32_ENTRY` in 32-bit protected mode with paging off, flat
//! segments, and EBX holding the guest-physical address of `hvm_start_info`.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use para_abi::layout::{AP_TRAMPOLINE, KERNEL_LOAD, LOW_MEMORY_END};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::kvm::memory::GuestMem;

/// `hvm_start_info` lives here (below 1 MiB, away from the AP trampoline page).
pub const START_INFO: u64 = 0x6000;
/// The E820-style memory map follows the start info in the same page.
pub const MEMMAP: u64 = 0x6100;
/// The command line gets a page of its own.
pub const CMDLINE: u64 = 0x7000;
/// Longest command line, including the terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// ACPI tables: the legacy BIOS read-only area, as PC firmware uses it.
pub const ACPI_BASE: u64 = 0xE_0000;
/// The end of conventional memory (640 KiB).
const LOW_RAM_END: u64 = 0xA_0000;

/// `XEN_HVM_START_MAGIC_VALUE` (Xen `public/arch-x86/hvm/start_info.h`).
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 entry types (ACPI 6.5 §15.1, "Address Range Types").
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

// Our boot structures must not overlap the page the guest copies its AP code to.
const _: () = assert!(START_INFO + 0x1000 <= AP_TRAMPOLINE || START_INFO >= AP_TRAMPOLINE + 0x1000);
const _: () = assert!(CMDLINE + 0x1000 <= AP_TRAMPOLINE);
const _: () = assert!(ACPI_BASE < LOW_MEMORY_END && ACPI_BASE >= LOW_RAM_END);

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel image is not a loadable ELF64 for this guest: {0}")]
    Load(linux_loader::loader::Error),
    #[error("kernel image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    #[error("kernel image loads at {0:#x}, below the 1 MiB the layout contract allows")]
    LoadsTooLow(u64),
    #[error("kernel image ends at {end:#x}, beyond guest RAM ({ram:#x})")]
    TooBig { end: u64, ram: u64 },
    #[error("command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("writing boot information failed: {0}")]
    Write(String),
}

/// `XEN_ELFNOTE_PHYS32_ENTRY` (Xen `public/elfnote.h`), in a note named "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `PT_NOTE` (ELF gABI, "Program Header").
const PT_NOTE: u32 = 4;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;

/// Why an image is no kernel the shim can boot, in one sentence each.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("cannot read it: {0}")]
    Read(String),
    #[error("it is not an ELF file (it does not start with 0x7f 'ELF')")]
    NotElf,
    #[error("it is an ELF file but not a 64-bit little-endian x86-64 one")]
    NotX86_64,
    #[error(
        "it is an ELF file without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); the shim boots only PVH kernels"
    )]
    NoPvhNote,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// Whether the notes in `notes` (one `PT_NOTE` segment) hold a PVH entry.
fn has_pvh_note(mut notes: &[u8]) -> bool {
    while notes.len() >= 12 {
        let (Some(namesz), Some(descsz), Some(kind)) =
            (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8))
        else {
            return false;
        };
        let name_end = 12 + (namesz as usize).next_multiple_of(4);
        let end = name_end + (descsz as usize).next_multiple_of(4);
        let Some(name) = notes.get(12..12 + namesz as usize) else {
            return false;
        };
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.strip_suffix(&[0]).unwrap_or(name) == b"Xen" {
            return true;
        }
        let Some(rest) = notes.get(end..) else {
            return false;
        };
        notes = rest;
    }
    false
}

/// The largest program header table or note segment the check reads; a
/// kernel's are a few hundred bytes.
const READ_MAX: usize = 1 << 20;

/// The check behind [`check_pvh_bytes`] and [`check_pvh_image`]: `read(off,
/// len)` returns up to `len` bytes at `off` (fewer at the end of the image).
/// Only the ELF header, the program headers and the note segments are read.
fn check_pvh(
    mut read: impl FnMut(usize, usize) -> Result<Vec<u8>, ImageError>,
) -> Result<(), ImageError> {
    let header = read(0, 64)?;
    if header.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ImageError::NotElf);
    }
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian.
    if header.get(4..6) != Some([2u8, 1].as_slice()) || u16_at(&header, 18) != Some(EM_X86_64) {
        return Err(ImageError::NotX86_64);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        u64_at(&header, 32),
        u16_at(&header, 54),
        u16_at(&header, 56),
    ) else {
        return Err(ImageError::NotX86_64);
    };
    let (phentsize, phnum) = (usize::from(phentsize), usize::from(phnum));
    let table = read(phoff, (phnum * phentsize).min(READ_MAX))?;
    for i in 0..phnum {
        let ph = i * phentsize;
        if u32_at(&table, ph) != Some(PT_NOTE) {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(&table, ph + 8), u64_at(&table, ph + 32)) else {
            continue;
        };
        if size > READ_MAX {
            continue;
        }
        let notes = read(off, size)?;
        if notes.len() == size && has_pvh_note(&notes) {
            return Ok(());
        }
    }
    Err(ImageError::NoPvhNote)
}

/// Checks that `image` is a 64-bit x86-64 ELF with a PVH entry note, before
/// any VM is made for it.
pub fn check_pvh_bytes(image: &[u8]) -> Result<(), ImageError> {
    check_pvh(|off, len| {
        Ok(image
            .get(off..)
            .map(|rest| rest[..len.min(rest.len())].to_vec())
            .unwrap_or_default())
    })
}

/// [`check_pvh_bytes`] on the file at `path`, reading only the headers and
/// notes: a kernel file with its debug information is megabytes, and reading
/// all of it cost milliseconds of every start.
pub fn check_pvh_image(path: &Path) -> Result<(), ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |e: std::io::Error| ImageError::Read(e.to_string());
    let mut file = File::open(path).map_err(err)?;
    check_pvh(|off, len| {
        file.seek(SeekFrom::Start(off as u64)).map_err(err)?;
        let mut bytes = Vec::with_capacity(len);
        (&mut file)
            .take(len as u64)
            .read_to_end(&mut bytes)
            .map_err(err)?;
        Ok(bytes)
    })
}

/// What the vCPU setup needs to know after loading.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    pub entry: u64,
    pub kernel_end: u64,
}

/// Loads the ELF image at `path` into `mem` at its physical addresses.
pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<Loaded, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let res = Elf::load(mem, None, &mut file, Some(GuestAddress(KERNEL_LOAD)))
        .map_err(BootError::Load)?;
    let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
        return Err(BootError::NoPvhEntry);
    };
    if entry.0 < KERNEL_LOAD {
        return Err(BootError::LoadsTooLow(entry.0));
    }
    let ram = mem.last_addr().0 + 1;
    if res.kernel_end > ram {
        return Err(BootError::TooBig {
            end: res.kernel_end,
            ram,
        });
    }
    Ok(Loaded {
        entry: entry.0,
        kernel_end: res.kernel_end,
    })
}

/// The memory map the guest gets: RAM below 640 KiB, the BIOS area (ACPI tables)
/// reserved, RAM from 1 MiB to the end of guest memory.
#[must_use]
pub fn memory_map(ram_size: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    vec![
        entry(0, LOW_RAM_END, E820_RAM),
        entry(ACPI_BASE, LOW_MEMORY_END - ACPI_BASE, E820_RESERVED),
        entry(LOW_MEMORY_END, ram_size - LOW_MEMORY_END, E820_RAM),
    ]
}

/// Writes the command line, memory map and `hvm_start_info` into guest memory.
pub fn write_start_info(mem: &GuestMem, cmdline: &str, rsdp: u64) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(|e| BootError::Write(e.to_string()))?;

    let ram_size = mem.last_addr().0 + 1;
    let map = memory_map(ram_size);
    let info = hvm_start_info {
        magic: HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(START_INFO));
    params.set_sections(&map, GuestAddress(MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMem>(&params, mem)
        .map_err(|e| BootError::Write(e.to_string()))
}

/// A flat 4 GiB segment (SDM vol 3 §3.4.5).
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The boot processor's registers at the PVH entry.
#[must_use]
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: START_INFO,
        // Bit 1 of RFLAGS is reserved and always 1 (SDM vol 1 §3.4.3).
        rflags: 0x2,
        ..Default::default()
    }
}

/// Adjusts `sregs` to the PVH entry state: protected mode, paging off, flat segments.
pub fn pvh_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = flat_segment(0x08, 0xB); // execute/read, accessed
    let data = flat_segment(0x10, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // A busy 32-bit TSS (SDM vol 3 §7.2.2); the guest loads its own before use.
    sregs.tr = kvm_segment {
        limit: 0x67,
        selector: 0x18,
        type_: 0xB,
        s: 0,
        db: 0,
        g: 0,
        ..flat_segment(0x18, 0xB)
    };
    // CR0.PE | CR0.ET; paging, caches and FPU state as after reset otherwise.
    sregs.cr0 = 0x11;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86-64 header with one `PT_NOTE` segment holding `note`.
    fn elf_with_note(note: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little-endian
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        b[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[72..80].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        b[96..104].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
        b.extend_from_slice(note);
        b
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn only_pvh_elf_images_pass_the_check() {
        let pvh = note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x10_0000u64.to_le_bytes(),
        );
        assert_eq!(check_pvh_bytes(&elf_with_note(&pvh)), Ok(()));
        // After another note.
        let mut two = note(b"GNU\0", 3, &[0; 20]);
        two.extend_from_slice(&pvh);
        assert_eq!(check_pvh_bytes(&elf_with_note(&two)), Ok(()));
        let other = note(b"Xen\0", 5, &[0; 8]);
        assert_eq!(
            check_pvh_bytes(&elf_with_note(&other)),
            Err(ImageError::NoPvhNote)
        );
        assert_eq!(
            check_pvh_bytes(b"#!/bin/sh\necho not a kernel\n"),
            Err(ImageError::NotElf)
        );
        assert_eq!(check_pvh_bytes(b""), Err(ImageError::NotElf));
        let mut arm = elf_with_note(&pvh);
        arm[18] = 183; // EM_AARCH64
        assert_eq!(check_pvh_bytes(&arm), Err(ImageError::NotX86_64));
        // Lying sizes and offsets are refused, never a panic.
        let mut lying = elf_with_note(&pvh);
        lying[96..104].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(check_pvh_bytes(&lying), Err(ImageError::NoPvhNote));
        let mut huge = note(b"Xen\0", 1, &[]);
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            check_pvh_bytes(&elf_with_note(&huge)),
            Err(ImageError::NoPvhNote)
        );
        // The host test binary is an ELF, but no PVH kernel.
        let me = std::env::current_exe().unwrap();
        assert_eq!(check_pvh_image(&me), Err(ImageError::NoPvhNote));
    }

    #[test]
    fn a_note_beyond_the_first_read_is_still_found() {
        let pvh = note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x10_0000u64.to_le_bytes(),
        );
        // The note far into the file, as in real images (after the code).
        let mut far = elf_with_note(&[]);
        let at = 600 * 1024;
        far[72..80].copy_from_slice(&(at as u64).to_le_bytes());
        far[96..104].copy_from_slice(&(pvh.len() as u64).to_le_bytes());
        far.resize(at, 0);
        far.extend_from_slice(&pvh);
        let dir = std::env::temp_dir().join(format!("shim-far-note-{}", std::process::id()));
        std::fs::write(&dir, &far).unwrap();
        let got = check_pvh_image(&dir);
        let _ = std::fs::remove_file(&dir);
        assert_eq!(got, Ok(()));
    }

    #[test]
    fn memory_map_reports_low_and_high_ram() {
        let map = memory_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].type_),
            (0, 0xA_0000, E820_RAM)
        );
        assert_eq!(map[1].type_, E820_RESERVED);
        assert_eq!(
            (map[2].addr, map[2].addr + map[2].size),
            (0x10_0000, 256 << 20)
        );
        // The trampoline page is plain RAM.
        assert!(
            map[0].addr <= AP_TRAMPOLINE && AP_TRAMPOLINE + 0x1000 <= map[0].addr + map[0].size
        );
    }

    #[test]
    fn start_info_round_trips() {
        let mem = crate::kvm::memory::create("t", 8 << 20).unwrap();
        write_start_info(&mem, "hello world", 0xE_0000).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO)).unwrap();
        assert_eq!(info.magic, HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.rsdp_paddr, 0xE_0000);
        assert_eq!(info.memmap_entries, 3);
        let last: hvm_memmap_table_entry = mem.read_obj(GuestAddress(MEMMAP + 2 * 24)).unwrap();
        assert_eq!(last.addr + last.size, 8 << 20);
        let mut buf = [0u8; 12];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&buf, b"hello world\0");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = crate::kvm::memory::create("t", 8 << 20).unwrap();
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            write_start_info(&mem, &long, 0),
            Err(BootError::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn garbage_image_is_refused() {
        let dir = std::env::temp_dir().join(format!("shim-boot-{}", std::process::id()));
        std::fs::write(
            &dir,
            b"not an elf at all, just bytes......................................",
        )
        .unwrap();
        let mem = crate::kvm::memory::create("t", 8 << 20).unwrap();
        assert!(matches!(load_kernel(&mem, &dir), Err(BootError::Load(_))));
        let _ = std::fs::remove_file(&dir);
        assert!(matches!(
            load_kernel(&mem, Path::new("/nonexistent/k")),
            Err(BootError::Open { .. })
        ));
    }
}
