//! M1's part of the stats JSON (`"doorbell"` of a guest, and `"monitors"`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::bench::BenchReport;

/// A guest's doorbell counters (M1) at its end.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DoorbellReport {
    pub offered: bool,
    pub events: u64,
    pub sink_events: u64,
    pub fallback_kicks: u64,
    pub overflow_drained: u64,
    /// Overflow entries that rang a real queue (part of `notifications.doorbell`).
    #[serde(skip)]
    pub overflow_notified: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub protected_writes: u64,
    /// Events other host threads posted through the guest's host-written
    /// range (`--rx-handoff monitor`), and wake-ups of a parked monitor they made.
    pub host_events: u64,
    pub host_kicks: u64,
    /// The notification benchmark's figures (`--notify-bench` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_bench: Option<BenchReport>,
}

/// One monitor's figures for the stats JSON (`monitors`).
#[derive(Debug, Default, Serialize)]
pub struct MonitorReport {
    pub cpu: usize,
    pub rings: usize,
    /// The priority it spun at: "idle" or "normal" (`--doorbell-spin-class`).
    pub spin_class: &'static str,
    /// Spins started at idle priority.
    pub idle_spins: u64,
    /// Times it was starved at idle priority and raised by the watch.
    pub starved_boosts: u64,
    /// Times it parked (slept until a kick or the timeout).
    pub parks: u64,
    /// Ring records and overflow entries it consumed (every guest, every range).
    pub served: u64,
}
