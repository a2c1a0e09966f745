//! Interrupts reach ring 3 as upcalls; the virtual interrupt flag holds them.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use core::time::Duration;
use guest_kernel::abi::vector;
use guest_kernel::arch::cpu::rdtsc;
use guest_kernel::percpu;
use guest_kernel::rt::time::{Instant, duration_to_cycles};
use guest_kernel::rt::{irq, sys, wait};
use guest_kernel::{check, check_eq, ktest};

static FIRED: AtomicU32 = AtomicU32::new(0);
static FIRED_AT: AtomicU64 = AtomicU64::new(0);

fn on_timer(_: u8) {
    FIRED_AT.store(rdtsc(), Ordering::Relaxed);
    FIRED.fetch_add(1, Ordering::Release);
}

struct TimerHandler;
impl TimerHandler {
    fn install() -> Self {
        FIRED.store(0, Ordering::Relaxed);
        irq::register(vector::TIMER, on_timer);
        Self
    }
}
impl Drop for TimerHandler {
    fn drop(&mut self) {
        sys::set_timer(0);
        irq::register(vector::TIMER, |_| {});
    }
}

ktest!(
    fn timer_interrupt_is_taken_while_ring3_computes() {
        let _h = TimerHandler::install();
        check!(irq::enabled(), "delivery is enabled for tests");
        let pc = percpu::current();
        let upcalls_before = pc.upcalls.load(Ordering::Relaxed);
        let deadline = rdtsc() + duration_to_cycles(Duration::from_millis(2));
        sys::set_timer(deadline);
        // Busy ring-3 work, no kernel call: only an upcall can change FIRED.
        let limit = rdtsc() + duration_to_cycles(Duration::from_secs(2));
        let mut x: u64 = 1;
        while FIRED.load(Ordering::Acquire) == 0 && rdtsc() < limit {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
        core::hint::black_box(x);
        check_eq!(
            FIRED.load(Ordering::Relaxed),
            1,
            "the timer handler ran once"
        );
        check!(
            pc.upcalls.load(Ordering::Relaxed) > upcalls_before,
            "it arrived as an upcall"
        );
        // TSC-deadline mode fires at the deadline exactly; the one-shot APIC timer
        // counts its own clock, calibrated against the TSC to within a fraction of a percent.
        let slack = duration_to_cycles(Duration::from_micros(100));
        check!(
            FIRED_AT.load(Ordering::Relaxed) + slack >= deadline,
            "not before its deadline"
        );
        Ok(())
    }
);

ktest!(
    fn virtual_interrupt_flag_holds_delivery_until_cleared() {
        let _h = TimerHandler::install();
        let pc = percpu::current();
        let was = irq::disable();
        let deadline = rdtsc() + duration_to_cycles(Duration::from_millis(2));
        sys::set_timer(deadline);
        // Spin well past the deadline with delivery masked.
        let until = deadline + duration_to_cycles(Duration::from_millis(20));
        while rdtsc() < until {
            core::hint::spin_loop();
        }
        let timer_bit = 1u64 << (vector::TIMER % 64);
        let pending = pc.pending[(vector::TIMER / 64) as usize].load(Ordering::Acquire);
        check_eq!(
            FIRED.load(Ordering::Relaxed),
            0,
            "held while the flag is clear"
        );
        check!(
            pending & timer_bit != 0,
            "the vector is recorded pending: {pending:#x}"
        );
        let released = Instant::now();
        irq::restore(was);
        check_eq!(
            FIRED.load(Ordering::Relaxed),
            1,
            "delivered exactly once on clearing the flag"
        );
        check!(
            FIRED_AT.load(Ordering::Relaxed) >= released.0,
            "delivered after the flag was cleared"
        );
        Ok(())
    }
);

ktest!(
    fn interrupt_wakes_a_halted_cpu() {
        let _h = TimerHandler::install();
        let deadline = Instant::now()
            .checked_add(Duration::from_millis(5))
            .ok_or("overflow")?;
        sys::set_timer(deadline.0);
        wait::wait_until(|| FIRED.load(Ordering::Acquire) != 0);
        check_eq!(FIRED.load(Ordering::Relaxed), 1);
        let slack = duration_to_cycles(Duration::from_micros(100));
        check!(
            Instant::now().0 + slack >= deadline.0,
            "woke before the deadline"
        );
        Ok(())
    }
);
