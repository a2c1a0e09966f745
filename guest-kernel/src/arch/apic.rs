//! The local APIC, in xAPIC (MMIO) or x2APIC (MSR) mode (SDM vol 3 ch. 11).
//!
//! What kernel calls and bring-up use is `#[inline]`: ring 0 is emulated
//! instruction by instruction here, and without the attribute whether these
//! few-instruction helpers are inlined into other modules depends on how the
//! compiler happens to split the crate into code units.

use super::cpu::msr;
use crate::abi::vector;
use core::sync::atomic::{AtomicU8, Ordering};
use para_abi::layout::LAPIC_BASE;
use x86_64::registers::model_specific::{ApicBase, ApicBaseFlags};

/// 1 in x2APIC mode. Read by the interrupt path's EOI (hence the fixed name).
/// Kernel-private memory: ring 3 must not be able to flip the EOI method.
#[unsafe(export_name = "exitless_x2apic_mode")]
#[unsafe(link_section = ".kdata")]
static X2APIC_MODE: AtomicU8 = AtomicU8::new(0);

/// Register offsets in the xAPIC page; the x2APIC MSR is 0x800 + offset / 16.
mod reg {
    pub const ID: u32 = 0x20;
    pub const TPR: u32 = 0x80;
    pub const SVR: u32 = 0xF0;
    pub const ESR: u32 = 0x280;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
}

const LVT_MASKED: u32 = 1 << 16;
const LVT_TSC_DEADLINE: u32 = 0b10 << 17;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = (0b101 << 8) | (1 << 14);
const ICR_STARTUP: u32 = (0b110 << 8) | (1 << 14);

/// 1 when the timer runs in TSC-deadline mode. Read by the halt call's fast
/// path (hence the fixed name), which arms the timer only in that mode.
#[unsafe(export_name = "exitless_tsc_deadline_mode")]
#[unsafe(link_section = ".kdata")]
static TSC_DEADLINE_MODE: AtomicU8 = AtomicU8::new(0);

#[inline]
#[must_use]
pub fn x2apic() -> bool {
    X2APIC_MODE.load(Ordering::Relaxed) != 0
}

/// Chooses the mode every CPU will use; call before [`init_local`] on the BSP.
pub fn set_mode(x2: bool) {
    X2APIC_MODE.store(u8::from(x2), Ordering::Relaxed);
}

#[inline]
unsafe fn read(r: u32) -> u32 {
    if x2apic() {
        // SAFETY: x2APIC mode is enabled, so the MSR exists.
        unsafe { msr::x2apic(r).read() as u32 }
    } else {
        // SAFETY: the xAPIC page is identity-mapped (supervisor, uncached).
        unsafe { core::ptr::read_volatile((LAPIC_BASE + u64::from(r)) as *const u32) }
    }
}

#[inline]
unsafe fn write(r: u32, v: u32) {
    if x2apic() {
        // SAFETY: x2APIC mode is enabled, so the MSR exists.
        unsafe { msr::x2apic(r).write(u64::from(v)) }
    } else {
        // SAFETY: the xAPIC page is identity-mapped (supervisor, uncached).
        unsafe { core::ptr::write_volatile((LAPIC_BASE + u64::from(r)) as *mut u32, v) }
    }
}

/// Enables this CPU's APIC, masks LINT0 and the timer, and returns the APIC id.
///
/// # Safety
/// Ring 0, once per CPU, interrupts disabled.
#[must_use]
pub unsafe fn init_local() -> u32 {
    // SAFETY: the register writes below follow SDM vol 3 §11.4.3 (enable via
    // IA32_APIC_BASE and SVR), §11.12.1 (x2APIC enable: EN then EXTD).
    unsafe {
        if x2apic() {
            let mut base = ApicBase::MSR;
            let enable = ApicBaseFlags::LAPIC_ENABLE.union(ApicBaseFlags::X2APIC_ENABLE);
            base.write(base.read() | enable.bits());
        }
        write(reg::TPR, 0);
        write(reg::SVR, 0x100 | u32::from(vector::SPURIOUS));
        write(reg::LVT_LINT0, LVT_MASKED);
        write(reg::LVT_TIMER, LVT_MASKED);
        write(reg::LVT_ERROR, u32::from(vector::APIC_ERROR));
        write(reg::ESR, 0);
        let id = read(reg::ID);
        if x2apic() { id } else { id >> 24 }
    }
}

/// Unmasks LINT0 with delivery mode `ExtINT` (0b111, SDM vol 3 §11.5.1), so that
/// an interrupt the VMM injects as if from an external controller (KVM's
/// `KVM_INTERRUPT` with a split irqchip) is accepted.
///
/// # Safety
/// Ring 0, after [`init_local`].
#[inline]
pub unsafe fn lint0_extint() {
    // SAFETY: an LVT write; the vector field is ignored for ExtINT.
    unsafe { write(reg::LVT_LINT0, 0b111 << 8) }
}

/// Programs the timer LVT for the chosen mode, unmasked, on the timer vector.
///
/// # Safety
/// Ring 0, after [`init_local`].
#[inline]
pub unsafe fn setup_timer(tsc_deadline: bool) {
    // SAFETY: LVT timer and divide configuration writes (SDM vol 3 §11.5.4).
    unsafe {
        if tsc_deadline {
            write(reg::LVT_TIMER, LVT_TSC_DEADLINE | u32::from(vector::TIMER));
            TSC_DEADLINE_MODE.store(1, Ordering::Relaxed);
        } else {
            write(reg::TIMER_DIVIDE, 0b1011);
            write(reg::LVT_TIMER, u32::from(vector::TIMER));
        }
    }
}

/// Arms the one-shot timer for `ticks` APIC timer ticks (0 stops it).
///
/// # Safety
/// Ring 0, after [`setup_timer`] in one-shot mode.
#[inline]
pub unsafe fn arm_oneshot(ticks: u32) {
    // SAFETY: writing the initial count starts (or, with 0, stops) the timer.
    unsafe { write(reg::TIMER_INITIAL, ticks) }
}

/// Arms the TSC-deadline timer (0 disarms; a past deadline fires at once).
///
/// # Safety
/// Ring 0, after [`setup_timer`] in TSC-deadline mode.
#[inline]
pub unsafe fn arm_deadline(tsc: u64) {
    // SAFETY: IA32_TSC_DEADLINE exists when CPUID.1:ECX[24] is set (SDM vol 3 §11.5.4.1).
    unsafe { msr::tsc_deadline().write(tsc) }
}

/// Starts the one-shot timer from its maximum count, masked, for calibration.
///
/// # Safety
/// Ring 0, before [`setup_timer`].
pub unsafe fn start_free_running() {
    // SAFETY: masked LVT, divide by 1, maximum count.
    unsafe {
        write(reg::LVT_TIMER, LVT_MASKED);
        write(reg::TIMER_DIVIDE, 0b1011);
        write(reg::TIMER_INITIAL, u32::MAX);
    }
}

/// Ticks elapsed since [`start_free_running`], and stops the timer.
///
/// # Safety
/// Ring 0.
#[must_use]
pub unsafe fn stop_free_running() -> u32 {
    // SAFETY: reading the current count and stopping the timer.
    unsafe {
        let elapsed = u32::MAX - read(reg::TIMER_CURRENT);
        write(reg::TIMER_INITIAL, 0);
        elapsed
    }
}

#[inline]
unsafe fn send_icr(dest: u32, low: u32) {
    // SAFETY: ICR writes (SDM vol 3 §11.6.1; x2APIC §11.12.9: one 64-bit MSR write).
    unsafe {
        if x2apic() {
            msr::x2apic(reg::ICR_LOW).write((u64::from(dest) << 32) | u64::from(low));
        } else {
            while read(reg::ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
                core::hint::spin_loop();
            }
            write(reg::ICR_HIGH, dest << 24);
            write(reg::ICR_LOW, low);
        }
    }
}

/// Sends a fixed interrupt with `vector` to the CPU with APIC id `dest`.
///
/// # Safety
/// Ring 0; `vector` must be one the receiver handles (≥ 32).
#[inline]
pub unsafe fn send_ipi(dest: u32, vector: u8) {
    // SAFETY: fixed delivery, physical destination.
    unsafe { send_icr(dest, u32::from(vector)) }
}

/// INIT then start-up IPI towards `dest` (SDM vol 3 §9.4.4.1); with `init`
/// false, only a further start-up IPI.
///
/// # Safety
/// Ring 0; the start-up code must be in place at `page << 12`.
pub unsafe fn send_init_sipi(dest: u32, page: u8, init: bool) {
    // SAFETY: the caller placed the trampoline; these are the standard IPIs.
    unsafe {
        if init {
            send_icr(dest, ICR_INIT_ASSERT);
        }
        send_icr(dest, ICR_STARTUP | u32::from(page));
    }
}
