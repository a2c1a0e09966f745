//! A function's 4 KiB configuration space with per-bit write masks.
//!
//! Type 0 header layout per PCI Local Bus 3.0 §6.1; read-only bits keep their
//! value whatever the guest writes, and such writes are reported to the caller.

use super::ecam::access_ok;
use crate::counters::Reject;

pub const VENDOR_ID: u16 = 0x00;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION: u16 = 0x08;
pub const HEADER_TYPE: u16 = 0x0E;
pub const BAR0: u16 = 0x10;
pub const SUBSYSTEM_VENDOR: u16 = 0x2C;
pub const CAP_PTR: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3C;
/// Status bit 4: the capability list is valid (PCI 3.0 §6.2.3).
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Command bits a guest may change: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_WRITABLE: u16 = 0b0000_0101_0100_0111;
/// Command bit 1: memory space decoding on.
pub const COMMAND_MEMORY: u16 = 1 << 1;

pub struct ConfigSpace {
    bytes: [u8; 4096],
    wmask: [u8; 4096],
    next_cap: u16,
    last_cap: Option<u16>,
    /// The address the shim gave each 64-bit BAR, by its first slot.
    bar_homes: [Option<u64>; 6],
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ConfigSpace({:04x}:{:04x})",
            self.read16(0),
            self.read16(2)
        )
    }
}

impl ConfigSpace {
    /// A type 0 header with ids and class; everything read-only except the command
    /// register and the interrupt line.
    #[must_use]
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, subsystem: (u16, u16)) -> Self {
        let mut c = Self {
            bytes: [0; 4096],
            wmask: [0; 4096],
            next_cap: 0x40,
            last_cap: None,
            bar_homes: [None; 6],
        };
        c.set16(VENDOR_ID, vendor);
        c.set16(2, device);
        c.bytes[REVISION as usize] = revision;
        c.bytes[0x09..0x0C].copy_from_slice(&class.to_le_bytes()[..3]);
        c.set16(SUBSYSTEM_VENDOR, subsystem.0);
        c.set16(SUBSYSTEM_VENDOR + 2, subsystem.1);
        c.wmask[COMMAND as usize..COMMAND as usize + 2]
            .copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c.wmask[INTERRUPT_LINE as usize] = 0xFF;
        c
    }

    pub fn set16(&mut self, off: u16, v: u16) {
        self.bytes[off as usize..off as usize + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set32(&mut self, off: u16, v: u32) {
        self.bytes[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[must_use]
    pub fn read16(&self, off: u16) -> u16 {
        u16::from_le_bytes([self.bytes[off as usize], self.bytes[off as usize + 1]])
    }

    #[must_use]
    pub fn read32(&self, off: u16) -> u32 {
        let o = off as usize;
        u32::from_le_bytes([
            self.bytes[o],
            self.bytes[o + 1],
            self.bytes[o + 2],
            self.bytes[o + 3],
        ])
    }

    /// Makes `len` bytes at `off` writable with the given per-byte masks.
    pub fn set_writable(&mut self, off: u16, mask: &[u8]) {
        self.wmask[off as usize..off as usize + mask.len()].copy_from_slice(mask);
    }

    /// Declares a 64-bit memory BAR of `size` (a power of two ≥ 4 KiB) at `base`,
    /// using BAR slots `index` and `index + 1` (PCI 3.0 §6.2.5.1).
    pub fn set_bar64(&mut self, index: u16, base: u64, size: u64) {
        debug_assert!(size.is_power_of_two() && size >= 4096 && base.is_multiple_of(size));
        let off = BAR0 + index * 4;
        // Bits 2:1 = 0b10: 64-bit; bit 3 prefetchable left clear (MMIO registers).
        self.set32(off, (base as u32) | 0b100);
        self.set32(off + 4, (base >> 32) as u32);
        let mask = !(size - 1);
        self.set_writable(off, &((mask as u32) & !0xF).to_le_bytes());
        self.set_writable(off + 4, &((mask >> 32) as u32).to_le_bytes());
        if let Some(home) = self.bar_homes.get_mut(index as usize) {
            *home = Some(base);
        }
    }

    /// The current address of the 64-bit BAR at slot `index`.
    #[must_use]
    pub fn bar64(&self, index: u16) -> u64 {
        let off = BAR0 + index * 4;
        u64::from(self.read32(off) & !0xF) | (u64::from(self.read32(off + 4)) << 32)
    }

    /// Appends a capability with `body` (after the id/next bytes) and per-byte write
    /// masks for the body; returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], body_wmask: &[u8]) -> u16 {
        let at = self.next_cap;
        self.bytes[at as usize] = id;
        self.bytes[at as usize + 1] = 0;
        self.bytes[at as usize + 2..at as usize + 2 + body.len()].copy_from_slice(body);
        self.wmask[at as usize + 2..at as usize + 2 + body_wmask.len()].copy_from_slice(body_wmask);
        if let Some(prev) = self.last_cap {
            self.bytes[prev as usize + 1] = at as u8;
        } else {
            self.bytes[CAP_PTR as usize] = at as u8;
            let s = self.read16(STATUS) | STATUS_CAP_LIST;
            self.set16(STATUS, s);
        }
        self.last_cap = Some(at);
        self.next_cap = (at + 2 + body.len() as u16).next_multiple_of(4);
        at
    }

    /// Reads with PCI rules: a bad size/alignment reads all ones.
    pub fn read(&self, off: u16, data: &mut [u8]) -> Option<Reject> {
        if !access_ok(off, data.len()) {
            data.fill(0xFF);
            return Some(Reject::PciConfigBadAccess);
        }
        data.copy_from_slice(&self.bytes[off as usize..off as usize + data.len()]);
        None
    }

    /// Writes through the write mask. Returns `PciConfigReadOnly` when the guest
    /// tried to change a read-only bit (the rest of the write still applies),
    /// else `BarRelocation` when the write moved a BAR away from where the shim
    /// put it (accepted: the device follows; counted, because nothing the shim
    /// boots does it).
    pub fn write(&mut self, off: u16, data: &[u8]) -> Option<Reject> {
        if !access_ok(off, data.len()) {
            return Some(Reject::PciConfigBadAccess);
        }
        let mut ro_change = false;
        for (i, &v) in data.iter().enumerate() {
            let o = off as usize + i;
            let m = self.wmask[o];
            // The status register's error bits are write-1-to-clear (PCI 3.0
            // §6.2.3); drivers write it back with the command register in one
            // dword, so a write of zeros there changes nothing and is no violation.
            let rw1c_zero = (STATUS as usize..STATUS as usize + 2).contains(&o) && v == 0;
            ro_change |= (v ^ self.bytes[o]) & !m != 0 && !rw1c_zero;
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
        }
        // Writing all ones to a BAR to size it is not a read-only violation (PCI 3.0 §6.2.5.1).
        let in_bars = (BAR0..BAR0 + 24).contains(&off);
        let bar_probe = in_bars && data.iter().all(|&b| b == 0xFF);
        if ro_change && !bar_probe {
            return Some(Reject::PciConfigReadOnly);
        }
        // Sizing leaves the mask in the BAR until the driver writes the
        // address back: only a non-probe write that leaves a BAR elsewhere
        // than its home moved it.
        let moved = in_bars
            && !bar_probe
            && self
                .bar_homes
                .iter()
                .enumerate()
                .any(|(i, home)| home.is_some_and(|h| self.bar64(i as u16) != h));
        moved.then_some(Reject::BarRelocation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs() -> ConfigSpace {
        ConfigSpace::new(0x1AF4, 0x1041, 0x02_00_00, 1, (0x1AF4, 1))
    }

    #[test]
    fn command_and_status_dword_write_is_not_a_violation() {
        let mut c = cs();
        // The usual driver write: command = memory | bus master | INTx disable, status = 0.
        assert_eq!(c.write(COMMAND, &[0x06, 0x04, 0, 0]), None);
        assert_eq!(c.read16(COMMAND), 0x0406);
        assert!(
            c.write(STATUS, &[0xFF, 0xFF]).is_some(),
            "setting status bits still is"
        );
    }

    #[test]
    fn sizing_is_not_a_move_and_a_move_is_counted() {
        let mut c = cs();
        c.set_bar64(0, 0xC000_0000, 0x4000);
        // Sizing: all ones, read back, the address back; both halves.
        assert_eq!(c.write(BAR0, &[0xFF; 4]), None);
        assert_eq!(c.read32(BAR0) & !0xF, 0xFFFF_C000);
        assert_eq!(c.write(BAR0, &0xC000_0004u32.to_le_bytes()), None);
        assert_eq!(c.write(BAR0 + 4, &[0xFF; 4]), None);
        assert_eq!(c.write(BAR0 + 4, &[0; 4]), None);
        assert_eq!(c.bar64(0), 0xC000_0000);
        // A move: accepted (the device follows), counted.
        assert_eq!(
            c.write(BAR0, &0xD000_0004u32.to_le_bytes()),
            Some(Reject::BarRelocation)
        );
        assert_eq!(c.bar64(0), 0xD000_0000);
        // Writing the home address back is no move.
        assert_eq!(c.write(BAR0, &0xC000_0004u32.to_le_bytes()), None);
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = cs();
        assert_eq!(
            c.write(VENDOR_ID, &[0, 0, 0, 0]),
            Some(Reject::PciConfigReadOnly)
        );
        let mut d = [0u8; 4];
        c.read(0, &mut d);
        assert_eq!(d, [0xF4, 0x1A, 0x41, 0x10]);
        // Class code 02 00 00 at 0x09..0x0B, revision 1.
        c.read(8, &mut d);
        assert_eq!(d, [1, 0, 0, 2]);
    }

    #[test]
    fn command_register_takes_only_defined_bits() {
        let mut c = cs();
        assert_eq!(c.write(COMMAND, &[0x06, 0x00]), None);
        assert_eq!(c.read16(COMMAND), 0x06);
        assert_eq!(
            c.write(COMMAND, &[0xFF, 0xFF]),
            Some(Reject::PciConfigReadOnly)
        );
        assert_eq!(c.read16(COMMAND), COMMAND_WRITABLE);
    }

    #[test]
    fn bar_sizing_reports_size_and_restores() {
        let mut c = cs();
        c.set_bar64(0, 0xC000_0000, 0x8000);
        assert_eq!(c.write(BAR0, &[0xFF; 4]), None);
        assert_eq!(c.read32(BAR0), 0xFFFF_8004);
        assert_eq!(c.write(BAR0 + 4, &[0xFF; 4]), None);
        assert_eq!(c.read32(BAR0 + 4), 0xFFFF_FFFF);
        c.write(BAR0, &0xC000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &[0; 4]);
        assert_eq!(c.bar64(0), 0xC000_0000);
    }

    #[test]
    fn capability_chain_links() {
        let mut c = cs();
        let a = c.add_capability(0x09, &[16, 1], &[]);
        let b = c.add_capability(0x11, &[0, 0], &[0, 0xC0]);
        assert_eq!(c.read16(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        let mut p = [0u8];
        c.read(CAP_PTR, &mut p);
        assert_eq!(u16::from(p[0]), a);
        c.read(a + 1, &mut p);
        assert_eq!(u16::from(p[0]), b);
        c.read(b + 1, &mut p);
        assert_eq!(p[0], 0);
        // The capability's writable byte takes bits 7:6 only.
        c.write(b + 3, &[0xFF]);
        c.read(b + 3, &mut p);
        assert_eq!(p[0], 0xC0);
    }

    #[test]
    fn misaligned_access_is_refused() {
        let mut c = cs();
        let mut d = [0u8; 4];
        assert_eq!(c.read(2, &mut d), Some(Reject::PciConfigBadAccess));
        assert_eq!(d, [0xFF; 4]);
        assert_eq!(c.write(3, &[0, 0]), Some(Reject::PciConfigBadAccess));
    }
}
