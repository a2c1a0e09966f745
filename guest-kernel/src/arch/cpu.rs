//! Single-instruction wrappers for privileged and timing instructions.
//! Port I/O and MSR access are ring-0 only (ring 3 has IOPL 0 here).

use core::arch::asm;

/// # Safety
/// Ring 0 only; the port must belong to a device whose side effects the caller wants.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port write.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem, preserves_flags));
    }
}

/// # Safety
/// As [`outb`].
#[inline]
#[must_use]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller vouches for the port read.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nostack, nomem, preserves_flags));
    }
    v
}

/// # Safety
/// As [`outb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port write.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, nomem, preserves_flags));
    }
}

/// # Safety
/// As [`outb`].
#[inline]
#[must_use]
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: the caller vouches for the port read.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nostack, nomem, preserves_flags));
    }
    v
}

/// # Safety
/// Ring 0 only; the MSR must exist (else #GP).
#[inline]
#[must_use]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists and we run in ring 0.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, nomem, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// # Safety
/// Ring 0 only; the MSR must exist and the value must be valid for it.
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid in ring 0.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, nomem, preserves_flags));
    }
}

/// The time-stamp counter. Not trapped in either ring here (CR4.TSD stays clear).
#[inline]
#[must_use]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID (costs an exit, ~15 µs here: call it at boot, not on hot paths).
#[inline]
#[must_use]
pub fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// The current privilege level, from CS.
#[inline]
#[must_use]
pub fn cpl() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nostack, nomem, preserves_flags)) }
    (cs & 3) as u8
}

/// CR2: the faulting linear address of the last page fault.
#[inline]
#[must_use]
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: ring 0 only (callers are exception handlers); no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nostack, nomem, preserves_flags)) }
    v
}

/// CR0 (SDM vol 3 §2.5). Ring 0 only.
#[inline]
#[must_use]
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: ring 0 only (kernel calls); no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nostack, nomem, preserves_flags)) }
    v
}

pub mod msr {
    pub const APIC_BASE: u32 = 0x1B;
    pub const TSC_DEADLINE: u32 = 0x6E0;
    pub const GS_BASE: u32 = 0xC000_0101;
}
