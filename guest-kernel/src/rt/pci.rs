//! PCI configuration space from ring 3: memory-mapped ECAM when ACPI describes
//! one (PCI Express Base 5.0 §7.2.2), else configuration mechanism #1 through
//! kernel calls (ports are ring-0 only here).

use super::platform::Ecam;
use super::sys;
use alloc::vec::Vec;
use core::fmt;

/// Bus/device/function, packed as `bus << 8 | device << 3 | function`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf(pub u16);

impl Bdf {
    #[must_use]
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self(((bus as u16) << 8) | (((device & 0x1F) as u16) << 3) | (function & 7) as u16)
    }
    #[must_use]
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    #[must_use]
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1F) as u8
    }
    #[must_use]
    pub const fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
}

impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How configuration space is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Ecam(Ecam),
    Ports,
}

impl Access {
    /// Reads the dword at `offset` (aligned down to 4). All-ones when absent.
    #[must_use]
    pub fn read(self, bdf: Bdf, offset: u16) -> u32 {
        let offset = offset & !3;
        match self {
            Self::Ecam(e) => match ecam_address(e, bdf, offset) {
                // SAFETY: inside the ECAM window ACPI described, identity-mapped
                // for ring 3 (uncached, in the MMIO hole).
                Some(a) => unsafe { core::ptr::read_volatile(a as *const u32) },
                None => u32::MAX,
            },
            Self::Ports => {
                if offset > 0xFC {
                    return u32::MAX;
                }
                sys::pci_read(bdf.0, offset as u8).unwrap_or(u32::MAX)
            }
        }
    }

    /// Writes the dword at `offset` (aligned down to 4); ignored when unreachable.
    pub fn write(self, bdf: Bdf, offset: u16, value: u32) {
        let offset = offset & !3;
        match self {
            Self::Ecam(e) => {
                if let Some(a) = ecam_address(e, bdf, offset) {
                    // SAFETY: as in `read`.
                    unsafe { core::ptr::write_volatile(a as *mut u32, value) }
                }
            }
            Self::Ports => {
                if offset <= 0xFC {
                    let _ = sys::pci_write(bdf.0, offset as u8, value);
                }
            }
        }
    }
}

fn ecam_address(e: Ecam, bdf: Bdf, offset: u16) -> Option<u64> {
    if bdf.bus() < e.bus_start || bdf.bus() > e.bus_end || offset >= 4096 {
        return None;
    }
    // The MCFG base is that of bus 0 even when the range starts higher
    // (PCI Firmware 3.3 §4.1.2, table 4-3).
    let rel = u64::from(bdf.bus()) << 20
        | u64::from(bdf.device()) << 15
        | u64::from(bdf.function()) << 12;
    Some(e.base + rel + u64::from(offset))
}

/// One function found by [`enumerate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub header_type: u8,
}

/// Walks the hierarchy from bus 0 through PCI-to-PCI bridges. Reads only
/// device slots and present functions: each configuration read is an exit.
#[must_use]
pub fn enumerate(access: Access) -> Vec<Function> {
    let mut found = Vec::new();
    let mut buses = alloc::vec![0u8];
    let mut seen = [false; 256];
    while let Some(bus) = buses.pop() {
        if core::mem::replace(&mut seen[bus as usize], true) {
            continue;
        }
        for dev in 0..32 {
            for func in 0..8 {
                let bdf = Bdf::new(bus, dev, func);
                let id = access.read(bdf, 0);
                if id & 0xFFFF == 0xFFFF {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let class = access.read(bdf, 8);
                let header = (access.read(bdf, 0xC) >> 16) as u8;
                found.push(Function {
                    bdf,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: (class >> 24) as u8,
                    subclass: (class >> 16) as u8,
                    header_type: header & 0x7F,
                });
                if header & 0x7F == 1 {
                    let secondary = (access.read(bdf, 0x18) >> 8) as u8;
                    buses.push(secondary);
                }
                if func == 0 && header & 0x80 == 0 {
                    break;
                }
            }
        }
    }
    found
}
