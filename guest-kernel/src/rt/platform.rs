//! Platform discovery from ACPI, in ring 3: the CPUs (MADT, ACPI 6.5 §5.2.12)
//! and the PCI configuration space (MCFG, PCI Firmware 3.3 §4.1.2). The same
//! code runs under QEMU and the host shim: both describe the machine this way.

use crate::abi::{USER_END, is_user_range};
use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use alloc::vec::Vec;
use core::ptr::NonNull;

/// ACPI tables are read through the identity map, from ring 3.
#[derive(Clone, Copy, Debug)]
struct IdentityMap;

impl AcpiHandler for IdentityMap {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // Tables outside ring-3-readable memory would fault; refuse them
        // loudly instead (the firmware or VMM put them somewhere odd).
        let addr = physical_address as u64;
        let readable =
            is_user_range(addr, size as u64) || (addr >= 0x1000 && addr + size as u64 <= 0x10_0000);
        assert!(
            readable,
            "ACPI table at {addr:#x} (+{size:#x}) is outside ring-3-readable memory"
        );
        let ptr = NonNull::new(physical_address as *mut T).expect("ACPI table at address 0");
        // SAFETY: identity-mapped, readable memory (checked above) of `size` bytes.
        unsafe { PhysicalMapping::new(physical_address, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// One processor the MADT lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub apic_id: u32,
    /// Enabled, or "online capable" (may be started).
    pub usable: bool,
}

/// ECAM window of one PCI segment group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    pub base: u64,
    pub bus_start: u8,
    pub bus_end: u8,
}

#[derive(Clone, Debug)]
pub struct Platform {
    pub rsdp: u64,
    pub cpus: Vec<Cpu>,
    pub ioapics: Vec<u64>,
    pub ecam: Option<Ecam>,
}

#[derive(Debug)]
pub enum PlatformError {
    NoRsdp,
    Acpi(acpi::AcpiError),
    NoMadt,
}

impl core::fmt::Display for PlatformError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRsdp => write!(
                f,
                "no ACPI RSDP (neither in hvm_start_info nor in 0xE0000-0xFFFFF)"
            ),
            Self::Acpi(e) => write!(f, "ACPI tables unreadable: {e:?}"),
            Self::NoMadt => write!(f, "ACPI has no MADT: cannot find the CPUs"),
        }
    }
}

/// Looks for "RSD PTR " on 16-byte boundaries of the BIOS area (ACPI 6.5 §5.2.5.1),
/// for firmware that does not pass the RSDP in `hvm_start_info`.
fn scan_bios_area() -> Option<u64> {
    (0xE_0000u64..0x10_0000).step_by(16).find(|&a| {
        // SAFETY: low memory is identity-mapped and readable from ring 3.
        unsafe { core::ptr::read_volatile(a as *const [u8; 8]) == *b"RSD PTR " }
    })
}

/// Reads the MADT and MCFG starting from `rsdp` (0 = search the BIOS area).
pub fn discover(rsdp: u64) -> Result<Platform, PlatformError> {
    let rsdp = if rsdp != 0 {
        rsdp
    } else {
        scan_bios_area().ok_or(PlatformError::NoRsdp)?
    };
    // SAFETY: `rsdp` points at an RSDP per the boot protocol or the scan above;
    // the handler refuses tables it cannot read.
    let tables = unsafe { AcpiTables::from_rsdp(IdentityMap, rsdp as usize) }
        .map_err(PlatformError::Acpi)?;
    let madt = tables
        .find_table::<Madt>()
        .map_err(|_| PlatformError::NoMadt)?;
    let mut cpus = Vec::new();
    let mut ioapics = Vec::new();
    for entry in madt.get().entries() {
        match entry {
            // Flags bit 0: enabled; bit 1: online capable (ACPI 6.5 §5.2.12.2).
            MadtEntry::LocalApic(e) => {
                let flags = e.flags;
                cpus.push(Cpu {
                    apic_id: u32::from(e.apic_id),
                    usable: flags & 0b11 != 0,
                });
            }
            MadtEntry::LocalX2Apic(e) => {
                let (id, flags) = (e.x2apic_id, e.flags);
                if !cpus.iter().any(|c: &Cpu| c.apic_id == id) {
                    cpus.push(Cpu {
                        apic_id: id,
                        usable: flags & 0b11 != 0,
                    });
                }
            }
            MadtEntry::IoApic(e) => {
                let addr = e.io_apic_address;
                ioapics.push(u64::from(addr));
            }
            _ => {}
        }
    }
    let ecam = tables.find_table::<Mcfg>().ok().and_then(|mcfg| {
        mcfg.entries()
            .iter()
            .find(|e| e.pci_segment_group == 0 && e.base_address < USER_END.max(0x1_0000_0000))
            .map(|e| Ecam {
                base: e.base_address,
                bus_start: e.bus_number_start,
                bus_end: e.bus_number_end,
            })
    });
    Ok(Platform {
        rsdp,
        cpus,
        ioapics,
        ecam,
    })
}
