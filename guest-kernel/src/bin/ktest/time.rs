//! Time: the calibrated TSC and sleeping on the local APIC timer.

use core::time::Duration;
use guest_kernel::arch::BOOT;
use guest_kernel::rt::time::{Instant, tsc_khz};
use guest_kernel::rt::wait::sleep;
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

/// Labels of the stats marks around [`timed_sleeps_wake_on_the_timer`]'s sleeps
/// (the guest-shim leg reads the exits between them).
pub const MARK_SLEEPS_BEFORE: u64 = 0x400;
pub const MARK_SLEEPS_AFTER: u64 = 0x401;
/// How many sleeps the test takes (`xtask/src/shim.rs` `TIMED_SLEEPS`).
pub const SLEEPS: u64 = 200;

ktest!(
    fn timed_sleeps_wake_on_the_timer() {
        use guest_kernel::rt::{irq, sys, wait};
        use para_abi::hypercall::Call;
        let cpu = guest_kernel::percpu::cpu_id();
        let timer = guest_kernel::abi::vector::TIMER;
        let step = Duration::from_micros(200);
        // A stats mark is a hypercall: only the shim answers it.
        let mark = |label| sys::hypercall(Call::StatsMark, label).is_ok();
        let fired0 = irq::count(cpu, timer);
        let marked = mark(MARK_SLEEPS_BEFORE);
        let t = Instant::now();
        for _ in 0..SLEEPS {
            let deadline = Instant::now().checked_add(step).ok_or("time")?;
            wait::wait_until_or(Some(deadline), || false);
            check!(Instant::now() >= deadline, "a timed sleep returned early");
        }
        let took = t.elapsed();
        if marked {
            check!(mark(MARK_SLEEPS_AFTER), "the closing stats mark");
        }
        // Not every sleep need reach its halt (a guest descheduled past the
        // deadline finds it passed first), so the firings are reported only;
        // a timer that never fired would leave the test hanging.
        let fired = irq::count(cpu, timer) - fired0;
        println!(
            "report: timed sleeps: {SLEEPS} of {} us took {} us in all, timer fired {fired} times",
            step.as_micros(),
            took.as_micros()
        );
        Ok(())
    }
);

ktest!(
    fn a_sleep_past_its_deadline_returns_with_the_timer_pending() {
        use guest_kernel::rt::{irq, sys};
        let cpu = guest_kernel::percpu::cpu_id();
        let timer = guest_kernel::abi::vector::TIMER;
        let fired0 = irq::count(cpu, timer);
        let was = irq::disable();
        sys::halt_until(Instant::now().0.saturating_sub(1));
        // The past deadline fired the timer at once: that ended the halt, and
        // with delivery masked the interrupt is still pending here.
        let pending = guest_kernel::percpu::current().any_pending();
        irq::restore(was);
        check!(pending, "the call returned with no interrupt pending");
        check!(
            irq::count(cpu, timer) > fired0,
            "the timer's handler did not run after delivery was unmasked"
        );
        Ok(())
    }
);
