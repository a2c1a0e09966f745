//! User-mode monitor/wait (WAITPKG: `UMONITOR`, `UMWAIT`; SDM vol 2B), the
//! closest user space gets to "a host CPU executing a memory-monitoring
//! instruction" (what M1 asks of its monitors): instead of spinning with `pause`, the monitor
//! arms the cache line a guest's producers write (`RingHeader::tail`) and waits
//! for a store to it, or a short TSC deadline, in the C0.1 state.
//!
//! Used only when CPUID says WAITPKG (leaf 7, ECX bit 5). The CPUs of the
//! machines this project runs on do not have it, so there the monitor keeps
//! its `pause` spin and this path is not exercised beyond the detection.

use std::sync::OnceLock;

/// CPUID.(EAX=7, ECX=0):ECX bit 5 (SDM vol 2A, CPUID, "WAITPKG").
const LEAF7_ECX_WAITPKG: u32 = 1 << 5;

/// The most TSC cycles one `UMWAIT` sleeps, so the monitor still sees its spin
/// budget run out, its other rings and its stop flag (a few µs at GHz rates).
pub const MAX_WAIT_CYCLES: u64 = 10_000;

/// True when this CPU supports `UMONITOR`/`UMWAIT`.
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let max = core::arch::x86_64::__cpuid(0).eax;
        if max < 7 {
            return false;
        }
        let l7 = core::arch::x86_64::__cpuid_count(7, 0);
        l7.ecx & LEAF7_ECX_WAITPKG != 0
    })
}

/// Waits until `addr`'s cache line is written or `MAX_WAIT_CYCLES` pass.
///
/// # Safety
/// The CPU must support WAITPKG ([`available`]); `addr` must be a readable
/// address (UMONITOR only arms the line, it does not access memory).
pub unsafe fn wait_for_write(addr: *const u8) {
    // SAFETY: rdtsc has no preconditions.
    let deadline = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_add(MAX_WAIT_CYCLES);
    // SAFETY: the caller guarantees WAITPKG. UMONITOR RSI arms the line of
    // `addr`; UMWAIT ECX=1 (C0.1: the lighter state, quicker to wake) waits for
    // a write to it or for the TSC to reach EDX:EAX. Encoded as bytes so the
    // assembler needs no target feature: F3 0F AE F6 = umonitor rsi,
    // F2 0F AE F1 = umwait ecx. UMWAIT writes CF (deadline reached).
    unsafe {
        core::arch::asm!(
            ".byte 0xf3, 0x0f, 0xae, 0xf6",
            ".byte 0xf2, 0x0f, 0xae, 0xf1",
            in("rsi") addr,
            in("ecx") 1u32,
            in("eax") deadline as u32,
            in("edx") (deadline >> 32) as u32,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    /// The kernel's view of the same CPUID bit is the `waitpkg` flag.
    #[test]
    fn detection_agrees_with_the_kernel() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let flag = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "waitpkg"));
        assert_eq!(super::available(), flag);
    }
}
