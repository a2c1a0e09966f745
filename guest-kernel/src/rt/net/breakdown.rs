//! The latency breakdown of one frame's trip, on this guest's TSC: the shim
//! hands the stamps of the last frame it put in NIC 0's RX ring in the wait
//! page (`para_abi::ctrl::wait::STAMPS`), converted to this guest's clock; the
//! stack adds when it first polled the ring after that, and the application
//! when it got the datagram. Stamps another guest or the shim wrote are
//! numbers for a report: a set out of order is skipped, never trusted.

use crate::rt::ctrl;
use crate::rt::time;
use alloc::string::String;
use alloc::vec::Vec;
use para_abi::report::percentile;

/// The stages, in trip order (names as the benchmark shows them).
pub const STAGES: [&str; 6] = [
    "sender_app_to_notify",
    "notify_to_host_saw",
    "host_saw_to_tx_popped",
    "tx_popped_to_rx_ring",
    "rx_ring_to_stack_poll",
    "stack_poll_to_app",
];

/// A stamp this far (µs) before the one it follows is clock error between
/// two guests' TSC offsets and counts as 0; more than that skips the set.
const SKEW_US: u64 = 20;

/// Per-stage durations (ns) of every frame recorded.
#[derive(Debug, Default)]
pub struct Breakdown {
    stages: [Vec<u64>; 6],
    /// Sets skipped: missing or out-of-order stamps.
    pub skipped: u64,
}

fn ns(ticks: u64) -> u64 {
    ticks.saturating_mul(1_000_000) / time::tsc_khz().max(1)
}

impl Breakdown {
    /// The application got the frame now; `stack_poll` is when the stack
    /// first polled the RX ring for it (guest TSC).
    pub fn record(&mut self, stack_poll: u64) {
        let Some(s) = ctrl::rx_stamps() else {
            self.skipped += 1;
            return;
        };
        let now = time::Instant::now().0;
        let points = [s[0], s[1], s[2], s[3], s[4], stack_poll, now];
        if points.contains(&0) {
            self.skipped += 1;
            return;
        }
        let mut d = [0u64; 6];
        for (i, w) in points.windows(2).enumerate() {
            if w[1] >= w[0] {
                d[i] = ns(w[1] - w[0]);
            } else if ns(w[0] - w[1]) <= SKEW_US * 1000 {
                d[i] = 0;
            } else {
                self.skipped += 1;
                return;
            }
        }
        for (v, x) in self.stages.iter_mut().zip(d) {
            v.push(x);
        }
    }

    /// Frames recorded.
    #[must_use]
    pub fn count(&self) -> usize {
        self.stages[0].len()
    }

    /// `{"frames": N, "skipped": M, "p50_ns": {stage: ns, ...}, "mean_ns": {...}}`.
    #[must_use]
    pub fn json(&mut self) -> String {
        let mut p50 = Vec::new();
        let mut mean = Vec::new();
        for (name, v) in STAGES.iter().zip(self.stages.iter_mut()) {
            v.sort_unstable();
            let m = if v.is_empty() {
                0
            } else {
                v.iter().sum::<u64>() / v.len() as u64
            };
            p50.push(alloc::format!(
                "\"{name}\": {}",
                percentile(v, 50).unwrap_or(0)
            ));
            mean.push(alloc::format!("\"{name}\": {m}"));
        }
        alloc::format!(
            "{{\"frames\": {}, \"skipped\": {}, \"p50_ns\": {{{}}}, \"mean_ns\": {{{}}}}}",
            self.count(),
            self.skipped,
            p50.join(", "),
            mean.join(", ")
        )
    }
}
