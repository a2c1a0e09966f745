//! Sleeping in ring 3 until something happens: a condition an interrupt
//! handler makes true, a deadline on this CPU's timer, or both. Each wait is a
//! halt kernel call made with delivery masked, so a wake-up that arrives
//! between the check and the halt is never slept through.

use super::irq::{self, disable, restore};
use super::time::Instant;
use core::time::Duration;

/// Sleeps (halting the CPU) until `cond` holds. Race-free: `cond` is checked
/// with delivery masked, and the halt call returns at once if an interrupt
/// became pending after the check, so a wake-up is never slept through.
pub fn wait_until(cond: impl FnMut() -> bool) {
    wait_until_or(None, cond);
}

/// [`wait_until`], also returning once `deadline` passes: each halt arms this
/// CPU's timer for it in the same kernel call.
pub fn wait_until_or(deadline: Option<Instant>, mut cond: impl FnMut() -> bool) {
    loop {
        let was = disable();
        if cond() || deadline.is_some_and(|d| Instant::now() >= d) {
            restore(was);
            return;
        }
        super::sys::halt_until(deadline.map_or(0, |d| d.0));
        restore(was);
    }
}

/// Halts until `deadline`, waking on this CPU's timer. Re-arms when the timer
/// fires early (the one-shot APIC timer counts in its own, calibrated, clock).
pub fn sleep_until(deadline: Instant) {
    let cpu = crate::percpu::cpu_id();
    let timer = crate::abi::vector::TIMER;
    while Instant::now() < deadline {
        let seen = irq::count(cpu, timer);
        wait_until_or(Some(deadline), || irq::count(cpu, timer) != seen);
    }
}

/// Halts for at least `d`.
pub fn sleep(d: Duration) {
    let deadline = Instant::now().checked_add(d).unwrap_or(Instant(u64::MAX));
    sleep_until(deadline);
}
