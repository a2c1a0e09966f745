//! Time: the calibrated TSC and sleeping on the local APIC timer.

use core::time::Duration;
use guest_kernel::arch::BOOT;
use guest_kernel::rt::time::{Instant, sleep, tsc_khz};
use guest_kernel::{check, ktest, println};

/// Generous: these machines are shared and (under TCG) emulated. The point is
/// to catch a timer that fires early, never, or in the wrong unit.
const LATE_TOLERANCE: Duration = Duration::from_millis(150);

ktest!(
    fn tsc_frequency_is_plausible() {
        let khz = tsc_khz();
        check!(
            (100_000..=10_000_000).contains(&khz),
            "TSC {khz} kHz is outside 0.1-10 GHz"
        );
        check!(
            BOOT.tsc_source.load(core::sync::atomic::Ordering::Relaxed) != 4,
            "calibration fell back to a guess"
        );
        Ok(())
    }
);

ktest!(
    fn sleep_is_accurate_within_tolerance() {
        for ms in [1u64, 10, 30] {
            let want = Duration::from_millis(ms);
            let t = Instant::now();
            sleep(want);
            let got = t.elapsed();
            check!(got >= want, "sleep({want:?}) returned early after {got:?}");
            check!(got <= want + LATE_TOLERANCE, "sleep({want:?}) took {got:?}");
            println!("report: sleep({} ms) took {} us", ms, got.as_micros());
        }
        Ok(())
    }
);

ktest!(
    fn instants_are_monotonic() {
        let mut last = Instant::now();
        for _ in 0..10_000 {
            let now = Instant::now();
            check!(now >= last);
            last = now;
        }
        Ok(())
    }
);
