//! The PCI surface a guest drives: configuration space through ECAM and
//! 0xCF8/0xCFC (BAR sizing and relocation, capability writes, MSI-X control),
//! and the virtio-pci BAR (common configuration, notify, ISR, device
//! configuration, MSI-X table and PBA), all on one bus with a virtio-net
//! function, as the shim builds it, without KVM.
//!
//! Input: a sequence of 16-byte accesses: kind, size, address, value.
#![no_main]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use host_shim::counters::RejectCounters;
use host_shim::devices::net::Net;
use host_shim::devices::switch::Switch;
use host_shim::kvm::memory::GuestMem;
use host_shim::pci::bus::{PciBus, SharedDevice};
use host_shim::pci::ecam::{ECAM_BASE, ECAM_SIZE};
use host_shim::pci::irq::{IrqError, MsiMessage, MsiRouter};
use host_shim::pci::msix::Msix;
use host_shim::pci::virtio_pci::{BAR_SIZE, VirtioPci};
use host_shim::platform::{MmioDevice, PioDevice};
use host_shim::sync::lock;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Routes go nowhere; GSIs are counted so a leak of them would show.
struct NoRouter(AtomicU32);

impl MsiRouter for NoRouter {
    fn allocate(&self) -> Result<(u32, EventFd), IrqError> {
        let gsi = self.0.fetch_add(1, Ordering::Relaxed);
        Ok((gsi, EventFd::new(0).map_err(|_| IrqError::NoGsi)?))
    }
    fn set_route(&self, _: u32, _: Option<MsiMessage>) -> Result<(), IrqError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let rejects = Arc::new(RejectCounters::default());
    let mut bus = PciBus::new("fuzz", rejects.clone());
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
    let switch = Arc::new(Switch::default());
    let Ok(net) = Net::new("fuzz", [2, 0, 0, 0, 0, 1], switch, rejects) else {
        return;
    };
    let router = Arc::new(NoRouter(AtomicU32::new(0)));
    let Ok(msix) = Msix::new(3, router) else {
        return;
    };
    let Some(bar) = bus.allocate_bar(BAR_SIZE) else {
        return;
    };
    let Ok(dev) = VirtioPci::new("fuzz", Box::new(net), Arc::new(msix), mem, None, bar) else {
        return;
    };
    let dev: SharedDevice = Arc::new(Mutex::new(dev));
    if bus.add(dev.clone()).is_none() {
        return;
    }
    for op in data.chunks_exact(16).take(256) {
        let size = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let addr = u64::from_le_bytes(op[0..8].try_into().unwrap()) >> 8;
        let value = &op[8..8 + size];
        let mut buf = [0u8; 8];
        match op[0] % 8 {
            // ECAM, and a little beyond its end.
            0 => {
                bus.mmio_read(ECAM_BASE + addr % (ECAM_SIZE + 0x1000), &mut buf[..size]);
            }
            1 => {
                bus.mmio_write(ECAM_BASE + addr % (ECAM_SIZE + 0x1000), value);
            }
            // The 0xCF8 address port and the 0xCFC..0xCFF data ports.
            2 => {
                bus.pio_write(0xCF8 + (addr & 7) as u16, value);
            }
            3 => {
                bus.pio_read(0xCF8 + (addr & 7) as u16, &mut buf[..size]);
            }
            // The BAR where it was first placed, through the bus (which
            // follows a relocation the guest made)...
            4 => {
                bus.mmio_write(bar + addr % BAR_SIZE, value);
            }
            5 => {
                bus.mmio_read(bar + addr % BAR_SIZE, &mut buf[..size]);
            }
            // ...and the function's BAR handlers directly, wherever it is now.
            6 => {
                let _ = lock(&dev).bar_write(0, addr % (BAR_SIZE + 8), value);
            }
            _ => {
                let _ = lock(&dev).bar_read(0, addr % (BAR_SIZE + 8), &mut buf[..size]);
            }
        }
    }
});
