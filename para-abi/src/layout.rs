//! The guest-physical layout contract between guest images and any VMM that boots them.
//!
//! The guest identity-maps the low 4 GiB with page tables precomputed in its image
//! (ring-0 code is emulated instruction by instruction on this platform, so a fill
//! loop at boot is too dear). A VMM places its own structures so that they fit.

/// Where guest images are linked and loaded (1 MiB).
pub const KERNEL_LOAD: u64 = 0x10_0000;

/// The 4 KiB page the guest copies its application-processor start-up code into.
/// A SIPI vector names a page below 1 MiB; this one is page 8 (SDM vol 3 §10.4.4).
/// A VMM must leave it as ordinary RAM and put nothing of its own there.
pub const AP_TRAMPOLINE: u64 = 0x8000;

/// Structures a VMM hands the guest (PVH `hvm_start_info`, its memory map, the
/// command line) belong below this address and away from [`AP_TRAMPOLINE`]. The
/// guest never allocates memory below it.
pub const LOW_MEMORY_END: u64 = 0x10_0000;

/// Guest RAM must end below this address: from here to 4 GiB is the MMIO hole
/// (ECAM, PCI BARs, IOAPIC, LAPIC), mapped uncached by the guest.
pub const MMIO_HOLE_START: u64 = 0xB000_0000;

/// Where a VMM that offers a para region puts it (guest-physical; cacheable,
/// user-accessible in the guest's boot page tables; never reported as RAM).
/// Guest RAM must then end below it.
pub const PARA_REGION_BASE: u64 = 0xA000_0000;
/// The most bytes the para region (M1's header, table and doorbell ranges) may
/// span; the fixed mechanism areas below follow it.
pub const PARA_REGION_MAX: u64 = 0x0800_0000;

/// Fixed guest-physical areas of the other mechanisms, each offered by its own
/// feature bit and CPUID leaf ([`crate::discovery`]) and mapped by the shim as its
/// own memslot(s). Cacheable and user-accessible in the guest's boot page tables
/// like the para region; never reported as RAM.
pub mod area {
    use super::{MMIO_HOLE_START, PARA_REGION_BASE, PARA_REGION_MAX};

    /// M2 interrupt-vCPU hints: one page of per-device-queue hint records.
    pub const HINTS: u64 = PARA_REGION_BASE + PARA_REGION_MAX;
    pub const HINTS_SIZE: u64 = 0x1000;
    /// M3 upcalls: one page of per-vCPU upcall mailboxes.
    pub const UPCALLS: u64 = HINTS + 0x1_0000;
    pub const UPCALLS_SIZE: u64 = 0x1000;
    /// M4 shadowed control flags: per-vCPU control blocks (64 KiB window).
    pub const CTRL: u64 = UPCALLS + 0x1_0000;
    pub const CTRL_SIZE: u64 = 0x1_0000;
    /// M5 VM queues: inbox, outbox, directory and the receive window (the rest of
    /// the window below the MMIO hole, from a 16 MiB boundary).
    pub const VMQ: u64 = PARA_REGION_BASE + PARA_REGION_MAX + 0x0100_0000;
    pub const VMQ_SIZE: u64 = MMIO_HOLE_START - VMQ;

    /// Direct channels between guests: one channel per peer, after the
    /// VM-queue area's receive window (36 MiB: 32 peers of 1.125 MiB).
    pub const DIRECT: u64 = VMQ + 0x0440_0000;
    pub const DIRECT_SIZE: u64 = 0x0240_0000;

    const _: () = assert!(CTRL + CTRL_SIZE <= VMQ);
    const _: () = assert!(DIRECT + DIRECT_SIZE <= MMIO_HOLE_START);
    const _: () = assert!(DIRECT.is_multiple_of(0x20_0000));
    const _: () = assert!(
        VMQ.is_multiple_of(0x20_0000),
        "2 MiB pages can be remapped there"
    );
}

/// Doorbell kick addresses (trapping MMIO writes bound to ioeventfds) lie in
/// this page range of the MMIO hole, mapped uncached and user-accessible.
pub const KICK_BASE: u64 = 0xFE00_0000;
/// Bytes reserved for kick addresses.
pub const KICK_SPAN: u64 = 0x10_0000;

/// The top of the 4 GiB range the guest maps at boot.
pub const IDENTITY_MAP_END: u64 = 0x1_0000_0000;

/// The local APIC's default MMIO base (SDM vol 3 §11.4.1), where the guest expects it.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// The IOAPIC's conventional MMIO base, as PC firmware and QEMU place it.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;

/// The COM1 16550 UART the guest writes its console to.
pub const SERIAL_PORT: u16 = 0x3F8;
/// QEMU's isa-debug-exit device, as the guest's xtask configures it.
pub const QEMU_DEBUG_EXIT_PORT: u16 = 0xF4;
