//! Exitless guest drivers, independent of the kernel: they speak to the
//! platform through `virtio_drivers::Hal` (DMA) and
//! `virtio_drivers::transport::pci::bus::ConfigurationAccess` (PCI
//! configuration), which the guest kernel implements.
//!
//! - [`msix`]: the MSI-X capability and table (PCI Local Bus 3.0 §6.8.2) and
//!   MSI messages aimed at a CPU (SDM vol 3 §11.11).
//! - [`virtio_pci`]: virtio-drivers' modern PCI transport wrapped so that
//!   every queue gets its own MSI-X vector, programmed and read back.
//! - [`net`]: virtio-net on that transport with non-blocking TX, pre-posted
//!   RX buffers, and a smoltcp `phy::Device`.
//! - [`vmq_net`]: a second NIC type, Ethernet frames over VM queues (M5),
//!   a smoltcp `phy::Device` over a link the guest kernel provides.
#![no_std]

extern crate alloc;
#[cfg(any(test, feature = "fuzzing"))]
extern crate std;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fake_device;
pub mod msix;
pub mod net;
pub mod virtio_pci;
pub mod vmq_net;
