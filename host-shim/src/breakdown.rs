//! The latency breakdown's host stamps: where one frame is on the host's TSC
//! as it crosses the shim (a leaf: the doorbell monitors, the NIC workers and
//! M4's wait page use it).
//!
//! A ping-pong has one frame in flight at a time, so one process-wide slot per
//! stage is enough to follow it: the sender's side fills [`TRIP`] as the frame
//! leaves its TX ring; the receiver's NIC worker reads it when it puts the
//! frame into the peer's RX ring and hands the stamps, converted to that
//! guest's TSC, to the guest (`para_abi::ctrl::wait::STAMPS`). With several
//! frames in flight the stamps of another frame may show: the guest drops any
//! set that is not in order, and these numbers are for benchmarks only.

use std::sync::atomic::{AtomicU64, Ordering};

/// The host's TSC now.
#[must_use]
pub fn now() -> u64 {
    // SAFETY: RDTSC has no preconditions in user space on x86_64 Linux (CR4.TSD clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The last time a doorbell monitor consumed a notification record, or a
/// vCPU's wait carried one (host TSC).
pub static NOTIFY_SEEN: AtomicU64 = AtomicU64::new(0);

/// The stamps of the frame that last left a guest's TX ring, on the host's TSC:
/// sender application, sender notify, host saw the notification, TX popped.
pub static TRIP: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Records a frame leaving a TX ring; `sender` holds the sender's own stamps
/// (application, notify), already on the host's TSC (0 = unknown).
pub fn tx_popped(sender: [u64; 2]) {
    let popped = now();
    let seen = NOTIFY_SEEN.load(Ordering::Relaxed);
    for (slot, v) in TRIP.iter().zip([sender[0], sender[1], seen, popped]) {
        slot.store(v, Ordering::Relaxed);
    }
}

/// The frame's stamps for the receiver, on its TSC (`to_guest` converts a
/// host TSC; 0 stays 0): the four of [`TRIP`] and the push itself, now.
#[must_use]
pub fn rx_pushed(to_guest: impl Fn(u64) -> u64) -> [u64; 5] {
    let pushed = now();
    let mut out = [0u64; 5];
    for (o, slot) in out.iter_mut().zip(&TRIP) {
        let v = slot.load(Ordering::Relaxed);
        *o = if v == 0 { 0 } else { to_guest(v) };
    }
    out[4] = to_guest(pushed);
    out
}
