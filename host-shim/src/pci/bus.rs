//! PCI bus 0: a host bridge at 00.0 and the shim's devices, reachable through ECAM
//! (MMIO) and the legacy 0xCF8/0xCFC mechanism (PCI Local Bus 3.0 §3.2.2.3.2); BARs
//! are assigned by the shim from a window of the MMIO hole.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::config::ConfigSpace;
use super::ecam::{self, ConfigAddress};
use super::{PciDevice, le_value};
use crate::counters::{Reject, RejectCounters};
use crate::platform::{MmioDevice, PioDevice};
use crate::sync::lock;

/// BARs are assigned from here up (above the ECAM window, below the IOAPIC).
pub const BAR_WINDOW: (u64, u64) = (0xC000_0000, 0xFEC0_0000);
const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// The host bridge: ids and class 06/00/00 only (PCI 3.0 appendix D).
struct HostBridge(ConfigSpace);

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let _ = self.0.read(offset, data);
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<Reject> {
        self.0.write(offset, data)
    }
    fn bars(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) -> Option<Reject> {
        data.fill(0xFF);
        None
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) -> Option<Reject> {
        None
    }
}

/// A device on the bus, shared with the vCPU threads that access it.
pub type SharedDevice = Arc<Mutex<dyn PciDevice>>;

pub struct PciBus {
    name: String,
    slots: Vec<SharedDevice>,
    cf8: AtomicU32,
    next_bar: Mutex<u64>,
    rejects: Arc<RejectCounters>,
}

impl PciBus {
    #[must_use]
    pub fn new(name: &str, rejects: Arc<RejectCounters>) -> Self {
        // Red Hat's QEMU PCIe host bridge ids: a plain, well-known host bridge.
        let bridge = HostBridge(ConfigSpace::new(
            0x1B36,
            0x0008,
            0x06_00_00,
            0,
            (0x1AF4, 0x1100),
        ));
        Self {
            name: name.to_owned(),
            slots: vec![Arc::new(Mutex::new(bridge))],
            cf8: AtomicU32::new(0),
            next_bar: Mutex::new(BAR_WINDOW.0),
            rejects,
        }
    }

    /// Reserves a naturally aligned BAR range of `size` bytes.
    pub fn allocate_bar(&self, size: u64) -> Option<u64> {
        let mut next = lock(&self.next_bar);
        let base = next.next_multiple_of(size);
        (base + size <= BAR_WINDOW.1).then(|| {
            *next = base + size;
            base
        })
    }

    /// Plugs a device into the next free slot; returns its device number.
    pub fn add(&mut self, dev: SharedDevice) -> Option<u8> {
        (self.slots.len() < 32).then(|| {
            self.slots.push(dev);
            (self.slots.len() - 1) as u8
        })
    }

    fn reject(&self, r: Reject, what: std::fmt::Arguments<'_>) {
        self.rejects.reject(r, &self.name, "PCI access", what);
    }

    fn slot(&self, a: ConfigAddress) -> Option<&SharedDevice> {
        if a.bus != 0 || a.function != 0 {
            return None;
        }
        self.slots.get(a.device as usize)
    }

    /// A configuration read; absent functions read all ones (vendor 0xFFFF).
    pub fn config_read(&self, a: ConfigAddress, data: &mut [u8]) {
        if !ecam::access_ok(a.offset, data.len()) {
            data.fill(0xFF);
            self.reject(
                Reject::PciConfigBadAccess,
                format_args!("read {} bytes at {a:?}", data.len()),
            );
            return;
        }
        match self.slot(a) {
            Some(d) => lock(d).config_read(a.offset, data),
            None => data.fill(0xFF),
        }
    }

    pub fn config_write(&self, a: ConfigAddress, data: &[u8]) {
        if !ecam::access_ok(a.offset, data.len()) {
            self.reject(
                Reject::PciConfigBadAccess,
                format_args!("write {data:x?} at {a:?}"),
            );
            return;
        }
        let Some(d) = self.slot(a) else { return };
        let r = lock(d).config_write(a.offset, data);
        if let Some(r) = r {
            self.reject(r, format_args!("config write {data:x?} at {a:?}"));
        }
    }

    /// The device and BAR index whose range holds `addr`, with the offset in it.
    fn bar_at(&self, addr: u64) -> Option<(&SharedDevice, usize, u64)> {
        self.slots.iter().skip(1).find_map(|d| {
            let bars = lock(d).bars();
            bars.iter().enumerate().find_map(|(i, &(base, size))| {
                (base != 0 && (base..base + size).contains(&addr)).then(|| (d, i, addr - base))
            })
        })
    }
}

impl PioDevice for PciBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                super::put_le(data, u64::from(self.cf8.load(Ordering::Relaxed)));
            }
            CONFIG_DATA..=0xCFF => {
                if let Some(a) =
                    ecam::decode_cf8(self.cf8.load(Ordering::Relaxed), port - CONFIG_DATA)
                {
                    self.config_read(a, data);
                } else {
                    data.fill(0xFF);
                    self.reject(
                        Reject::PciConfigBadAccess,
                        format_args!(
                            "{}-byte read from {port:#x} with CONFIG_ADDRESS disabled",
                            data.len()
                        ),
                    );
                }
            }
            0xCF8..=0xCFB => {
                data.fill(0xFF);
                self.reject(
                    Reject::PciConfigBadAccess,
                    format_args!("{}-byte read from {port:#x}", data.len()),
                );
            }
            _ => return false,
        }
        true
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            // Only a full dword write to 0xCF8 is CONFIG_ADDRESS (PCI 3.0 §3.2.2.3.2).
            CONFIG_ADDRESS if data.len() == 4 => {
                self.cf8.store(le_value(data) as u32, Ordering::Relaxed);
            }
            CONFIG_DATA..=0xCFF => {
                match ecam::decode_cf8(self.cf8.load(Ordering::Relaxed), port - CONFIG_DATA) {
                    Some(a) => self.config_write(a, data),
                    None => self.reject(
                        Reject::PciConfigBadAccess,
                        format_args!("write {data:x?} to {port:#x} with CONFIG_ADDRESS disabled"),
                    ),
                }
            }
            0xCF8..=0xCFB => self.reject(
                Reject::PciConfigBadAccess,
                format_args!("{}-byte write to {port:#x}", data.len()),
            ),
            _ => return false,
        }
        true
    }
}

impl MmioDevice for PciBus {
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some(a) = ecam::decode(addr) {
            self.config_read(a, data);
            return true;
        }
        let Some((d, bar, off)) = self.bar_at(addr) else {
            return false;
        };
        if let Some(r) = lock(d).bar_read(bar, off, data) {
            self.reject(
                r,
                format_args!("BAR read of {} bytes at {addr:#x}", data.len()),
            );
        }
        true
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some(a) = ecam::decode(addr) {
            self.config_write(a, data);
            return true;
        }
        let Some((d, bar, off)) = self.bar_at(addr) else {
            return false;
        };
        if let Some(r) = lock(d).bar_write(bar, off, data) {
            self.reject(r, format_args!("BAR write {data:x?} at {addr:#x}"));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::ecam::ECAM_BASE;

    #[test]
    fn host_bridge_answers_and_empty_slots_read_ones() {
        let bus = PciBus::new("t", Arc::default());
        let mut d = [0u8; 4];
        assert!(bus.mmio_read(ECAM_BASE, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x0008_1B36);
        assert!(bus.mmio_read(ECAM_BASE + (5 << 15), &mut d));
        assert_eq!(d, [0xFF; 4]);
        // The same through 0xCF8/0xCFC; class at 0x08 → 06 00 00.
        assert!(bus.pio_write(0xCF8, &0x8000_0008u32.to_le_bytes()));
        assert!(bus.pio_read(0xCFC, &mut d));
        assert_eq!(d[3], 0x06);
        // A byte read of the upper half of the class dword through 0xCFE.
        let mut b = [0u8; 1];
        assert!(bus.pio_read(0xCFF, &mut b));
        assert_eq!(b[0], 0x06);
    }

    #[test]
    fn hostile_config_accesses_are_counted() {
        let r: Arc<RejectCounters> = Arc::default();
        let bus = PciBus::new("t", r.clone());
        bus.mmio_write(ECAM_BASE, &[0u8; 4]); // vendor/device id: read-only
        assert_eq!(r.count(Reject::PciConfigReadOnly), 1);
        let mut d = [0u8; 4];
        bus.mmio_read(ECAM_BASE + 2, &mut d); // misaligned dword
        assert_eq!(r.count(Reject::PciConfigBadAccess), 1);
        bus.pio_write(0xCF9, &[1]); // not a CONFIG_ADDRESS write
        assert_eq!(r.count(Reject::PciConfigBadAccess), 2);
        // Nor reads of less than its dword: all ones, counted.
        let mut w = [0u8; 2];
        assert!(bus.pio_read(0xCF8, &mut w));
        assert_eq!(w, [0xFF; 2]);
        assert_eq!(r.count(Reject::PciConfigBadAccess), 3);
        // A data access while CONFIG_ADDRESS has its enable bit clear.
        assert!(bus.pio_write(0xCF8, &0x0000_0000u32.to_le_bytes()));
        assert!(bus.pio_read(0xCFC, &mut d));
        assert_eq!(d, [0xFF; 4]);
        assert!(bus.pio_write(0xCFC, &[1, 2, 3, 4]));
        assert_eq!(r.count(Reject::PciConfigBadAccess), 5);
        // Through 0xCFC..0xCFF, misaligned for its size (0xCFD + 2, 0xCFE + 4).
        assert!(bus.pio_write(0xCF8, &0x8000_0000u32.to_le_bytes()));
        assert!(bus.pio_read(0xCFD, &mut w));
        assert!(bus.pio_read(0xCFE, &mut d));
        assert_eq!(r.count(Reject::PciConfigBadAccess), 7);
        assert!(!bus.mmio_read(0xC000_0000, &mut d), "no BAR there yet");
    }

    #[test]
    fn bars_are_aligned_and_bounded() {
        let bus = PciBus::new("t", Arc::default());
        assert_eq!(bus.allocate_bar(0x8000), Some(0xC000_0000));
        assert_eq!(bus.allocate_bar(0x1000), Some(0xC000_8000));
        assert_eq!(bus.allocate_bar(0x8000), Some(0xC001_0000));
        assert_eq!(bus.allocate_bar(1 << 40), None);
    }
}
