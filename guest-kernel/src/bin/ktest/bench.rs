//! The reference loop timed in both rings: shows that ring 3 runs
//! natively while ring 0 does not on this platform's KVM.

use guest_kernel::abi::arith_loop;
use guest_kernel::arch::cpu::rdtsc;
use guest_kernel::rt::sys;
use guest_kernel::rt::time::cycles_to_duration;
use guest_kernel::{check_eq, ktest, println};

const ITERATIONS: u64 = 1_000_000;

ktest!(
    fn arith_loop_ring3_vs_ring0() {
        let t0 = rdtsc();
        let r3 = arith_loop(ITERATIONS);
        let ring3 = cycles_to_duration(rdtsc() - t0);
        let (cycles, r0) = sys::ring0_loop(ITERATIONS).map_err(|e| alloc::format!("{e:?}"))?;
        let ring0 = cycles_to_duration(cycles);
        check_eq!(r0, r3, "both rings computed the same value");
        // Microsecond-scale durations: far inside f64's exact integer range.
        #[allow(clippy::cast_precision_loss)]
        let ratio = ring0.as_nanos() as f64 / (ring3.as_nanos().max(1)) as f64;
        println!(
            "report: arith loop {} iterations: ring 3 {} us, ring 0 {} us (ring 0 / ring 3 = {:.1})",
            ITERATIONS,
            ring3.as_micros(),
            ring0.as_micros(),
            ratio
        );
        Ok(())
    }
);
