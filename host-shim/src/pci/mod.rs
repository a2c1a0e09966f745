//! PCI: configuration space, the host bridge and bus, ECAM and 0xCF8/0xCFC access,
//! MSI-X, and the virtio-pci modern transport.

pub mod bus;
pub mod config;
pub mod ecam;
pub mod irq;
pub mod msix;
pub mod virtio_pci;

use crate::counters::Reject;

/// A PCI function on the bus.
pub trait PciDevice: Send {
    /// Reads `data.len()` bytes (1, 2 or 4, naturally aligned) of configuration space.
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes configuration space; returns the reason when the write was (partly) refused.
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<Reject>;
    /// The memory BARs as (guest-physical base, size), for dispatch.
    fn bars(&self) -> Vec<(u64, u64)>;
    /// Reads from BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) -> Option<Reject>;
    /// Writes to BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Option<Reject>;
}

/// Little-endian value of a 1/2/4/8-byte access.
#[must_use]
pub fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Fills `data` with the low bytes of `v`, little-endian.
pub fn put_le(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
    data[n..].fill(0);
}
