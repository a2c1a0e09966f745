//! The ring-0 core for `x86_64`: boot, descriptor tables, interrupt
//! and exception entry, the local APIC, time calibration, AP start-up and the
//! kernel calls. Everything here runs emulated on this platform's KVM, so each
//! path is kept to as few instructions as it can be.

pub mod apic;
pub mod boot;
pub mod bootinfo;
pub mod cpu;
pub mod entry;
pub mod exit;
pub mod kmain;
pub mod pic;
pub mod serial;
pub mod syscall;
pub mod time;
pub mod trap;

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Facts ring 0 established at boot, published for ring 3 (read-only there).
#[derive(Debug)]
pub struct BootInfo {
    pub start_info: AtomicU64,
    pub tsc_at_entry: AtomicU64,
    pub tsc_at_kmain: AtomicU64,
    pub tsc_at_user: AtomicU64,
    pub tsc_khz: AtomicU64,
    pub lapic_khz: AtomicU64,
    /// 1 when the local APIC runs in x2APIC mode.
    pub x2apic: AtomicU8,
    /// 1 when the timer uses TSC-deadline mode.
    pub tsc_deadline: AtomicU8,
    /// 1 under the Exitless host shim.
    pub under_shim: AtomicU8,
    /// 1 when the shim has a debugger attached and takes ring 3's debug
    /// traps (`para_abi::discovery::features::DEBUG_TRAPS`).
    pub debug_traps: AtomicU8,
    /// Where `tsc_khz` came from (see [`time::Source`]).
    pub tsc_source: AtomicU8,
}

pub static BOOT: BootInfo = BootInfo {
    start_info: AtomicU64::new(0),
    tsc_at_entry: AtomicU64::new(0),
    tsc_at_kmain: AtomicU64::new(0),
    tsc_at_user: AtomicU64::new(0),
    tsc_khz: AtomicU64::new(0),
    lapic_khz: AtomicU64::new(0),
    x2apic: AtomicU8::new(0),
    tsc_deadline: AtomicU8::new(0),
    under_shim: AtomicU8::new(0),
    debug_traps: AtomicU8::new(0),
    tsc_source: AtomicU8::new(0),
};

impl BootInfo {
    pub fn get(&self, f: &AtomicU64) -> u64 {
        f.load(Ordering::Relaxed)
    }
}
