//! What the drivers need from the kernel: DMA memory and address translation
//! for virtio-drivers (`Hal`), PCI configuration access, and finding devices.
//! Guest-physical equals virtual here (identity map), so sharing a buffer
//! with a device is just naming its address.

use super::pci::{self, Access, Bdf};
use crate::mem::{FRAME_SIZE, heap};
use core::ptr::NonNull;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// virtio's PCI vendor id (virtio 1.2 §4.1.2).
pub const VIRTIO_VENDOR: u16 = 0x1AF4;
/// Network device: transitional id 0x1000, modern id 0x1040 + 1 (virtio 1.2 §4.1.2.1).
pub const NET_DEVICE_IDS: [u16; 2] = [0x1000, 0x1041];

/// DMA and address translation for virtio-drivers.
#[derive(Debug)]
pub struct KernelHal;

// SAFETY: `dma_alloc` returns zeroed, frame-aligned, identity-mapped RAM owned
// by the caller until `dma_dealloc`; `share` returns the physical address of
// the very memory passed in (identity map), which stays valid as long as the
// caller keeps the buffer, as the trait requires.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let paddr = heap::alloc_frames(pages, 1).expect("out of physical frames for DMA");
        let ptr = paddr as *mut u8;
        // SAFETY: freshly allocated frames, identity-mapped and writable.
        unsafe { core::ptr::write_bytes(ptr, 0, pages * FRAME_SIZE as usize) };
        (
            paddr,
            NonNull::new(ptr).expect("frame 0 is never allocated"),
        )
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        i32::from(heap::free_frames(paddr, pages).is_err())
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// PCI configuration access for virtio-drivers, on top of [`Access`].
#[derive(Clone, Copy, Debug)]
pub struct KernelPciAccess(pub Access);

fn bdf(df: DeviceFunction) -> Bdf {
    Bdf::new(df.bus, df.device, df.function)
}

impl ConfigurationAccess for KernelPciAccess {
    fn read_word(&self, df: DeviceFunction, register_offset: u8) -> u32 {
        self.0.read(bdf(df), u16::from(register_offset))
    }

    fn write_word(&mut self, df: DeviceFunction, register_offset: u8, data: u32) {
        self.0.write(bdf(df), u16::from(register_offset), data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        *self
    }
}

/// The virtio network functions on the PCI bus, in bus order.
#[must_use]
pub fn find_net_devices(access: Access) -> alloc::vec::Vec<DeviceFunction> {
    pci::enumerate(access)
        .into_iter()
        .filter(|f| f.vendor == VIRTIO_VENDOR && NET_DEVICE_IDS.contains(&f.device))
        .map(|f| DeviceFunction {
            bus: f.bdf.bus(),
            device: f.bdf.device(),
            function: f.bdf.function(),
        })
        .collect()
}
