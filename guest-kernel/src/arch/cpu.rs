//! The two timing and identification instructions both rings use, and the
//! MSR numbers the `x86_64` crate has no name for. Port I/O, MSR access,
//! control registers and descriptor-table loads come from the `x86_64` crate
//! (single-instruction inline-asm wrappers, so ring-0 paths keep their length).

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

/// Model-specific registers without a named type in the `x86_64` crate.
pub mod msr {
    use x86_64::registers::model_specific::Msr;

    /// IA32_TSC_DEADLINE (SDM vol 3 §11.5.4.1).
    #[inline]
    #[must_use]
    pub const fn tsc_deadline() -> Msr {
        Msr::new(0x6E0)
    }

    /// The x2APIC MSR of xAPIC register offset `offset`: 0x800 + offset / 16
    /// (SDM vol 3 §11.12.1.2).
    #[inline]
    #[must_use]
    pub const fn x2apic(offset: u32) -> Msr {
        Msr::new(0x800 + (offset >> 4))
    }
}
