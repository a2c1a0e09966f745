//! Time-stamp-counter (and APIC timer) frequency, found once at boot.
//!
//! In order of preference: the hypervisor timing leaf `0x4000_0010` (the Exitless
//! shim and QEMU/KVM with an invariant TSC fill it), CPUID leaf 0x15 (SDM vol 3
//! §18.7.3), or a measurement against PIT channel 0 read back by latch commands
//! (Intel 8254 datasheet). Channel 0 is used because its gate is always high;
//! channel 2's gate needs the PC speaker port, which not every machine has.

use super::apic;
use super::cpu::{cpuid, rdtsc};
use para_abi::discovery;
use x86_64::instructions::port::{Port, PortWriteOnly};

/// Where the TSC frequency came from.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    HypervisorLeaf = 1,
    CpuidLeaf15 = 2,
    Pit = 3,
    /// Nothing worked: 1 GHz assumed, and said so in the boot log.
    Assumed = 4,
}

impl Source {
    #[must_use]
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::HypervisorLeaf,
            2 => Self::CpuidLeaf15,
            3 => Self::Pit,
            _ => Self::Assumed,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::HypervisorLeaf => "hypervisor CPUID leaf 0x40000010",
            Self::CpuidLeaf15 => "CPUID leaf 0x15",
            Self::Pit => "PIT channel 0 measurement",
            Self::Assumed => "nothing (assumed 1 GHz)",
        }
    }
}

const PIT_HZ: u64 = 1_193_182;
/// The PIT's mode/command register (write-only).
const PIT_COMMAND: u16 = 0x43;
/// Channel 0's data port.
const PIT_CHANNEL0: u16 = 0x40;
/// 10 ms of PIT ticks.
const PIT_WINDOW: u64 = PIT_HZ / 100;
/// Give up on a PIT that does not count (no PIT at all reads back a constant).
const PIT_MAX_POLLS: u32 = 100_000;

/// Returns (TSC kHz, APIC timer kHz or 0 when not needed/known, source).
///
/// # Safety
/// Ring 0 on the boot CPU, after the local APIC is enabled.
#[must_use]
pub unsafe fn calibrate(max_hv_leaf: u32, need_apic_timer: bool) -> (u64, u64, Source) {
    if (discovery::LEAF_TIMING..0x4000_0100).contains(&max_hv_leaf) {
        let t = cpuid(discovery::LEAF_TIMING, 0);
        if t.eax != 0 && (!need_apic_timer || t.ebx != 0) {
            return (u64::from(t.eax), u64::from(t.ebx), Source::HypervisorLeaf);
        }
    }
    if !need_apic_timer && cpuid(0, 0).eax >= 0x15 {
        let l = cpuid(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let khz = u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1000;
            return (khz, 0, Source::CpuidLeaf15);
        }
    }
    // SAFETY: the caller is ring 0 with the APIC enabled, as this requires.
    match unsafe { measure_with_pit(need_apic_timer) } {
        Some((tsc, lapic)) => (tsc, lapic, Source::Pit),
        None => (1_000_000, 1_000_000, Source::Assumed),
    }
}

unsafe fn pit_read() -> u16 {
    let mut channel0 = Port::<u8>::new(PIT_CHANNEL0);
    // SAFETY: latch channel 0, read low then high byte.
    unsafe {
        PortWriteOnly::<u8>::new(PIT_COMMAND).write(0x00);
        let lo = channel0.read();
        let hi = channel0.read();
        u16::from_le_bytes([lo, hi])
    }
}

unsafe fn measure_with_pit(apic_timer: bool) -> Option<(u64, u64)> {
    let mut channel0 = Port::<u8>::new(PIT_CHANNEL0);
    // SAFETY: channel 0, lobyte/hibyte, mode 2, reload 65536; its IRQ is masked
    // at the PIC and IOAPIC, so this only makes it count.
    unsafe {
        PortWriteOnly::<u8>::new(PIT_COMMAND).write(0x34);
        channel0.write(0);
        channel0.write(0);
    }
    // SAFETY: as above; ring 0 with the APIC enabled.
    let mut prev = unsafe { pit_read() };
    if apic_timer {
        // SAFETY: see above.
        unsafe { apic::start_free_running() };
    }
    let t0 = rdtsc();
    let mut elapsed: u64 = 0;
    let mut polls = 0;
    while elapsed < PIT_WINDOW {
        // SAFETY: see above.
        let cur = unsafe { pit_read() };
        elapsed += u64::from(prev.wrapping_sub(cur));
        prev = cur;
        polls += 1;
        if polls > PIT_MAX_POLLS {
            return None;
        }
    }
    let t1 = rdtsc();
    let lapic_ticks = if apic_timer {
        // SAFETY: see above.
        u64::from(unsafe { apic::stop_free_running() })
    } else {
        0
    };
    let tsc_khz = (t1 - t0) * PIT_HZ / (elapsed * 1000);
    let lapic_khz = lapic_ticks * PIT_HZ / (elapsed * 1000);
    Some((tsc_khz, lapic_khz))
}
