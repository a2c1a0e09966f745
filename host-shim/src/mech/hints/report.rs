//! M2's part of the stats JSON (`"hints"`) and of the summary.

use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct QueueReport {
    pub device: u8,
    pub queue: u16,
    pub hints_sent: u64,
    pub hints_honoured: u64,
    pub hints_deferred: u64,
    /// Hints also announced by an M3 `HintUpdate` upcall.
    pub hints_announced: u64,
    /// Interrupts raised per destination vCPU (index = APIC id).
    pub irqs_by_vcpu: Vec<u64>,
    pub irqs_colocated: u64,
    pub last_host_cpu: Option<i32>,
    pub last_vcpus: Vec<u32>,
}

/// The `hints` key of a guest's stats.
#[derive(Debug, Default, Serialize)]
pub struct HintsReport {
    /// The hints page was offered (`--hints on`); otherwise only the counters
    /// of where interrupts went are kept.
    pub offered: bool,
    pub hints_sent: u64,
    pub hints_honoured: u64,
    pub io_cpu: Option<i32>,
    pub io_moves: u64,
    pub queues: Vec<QueueReport>,
    /// Refused guest accesses by reason (`page_write`), non-zero only.
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
}

impl HintsReport {
    /// The guest's line in the shim's summary table.
    #[must_use]
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let r = self;
        let mut s = format!(
            "hints{}: sent {} honoured {} | I/O thread cpu {} moves {}",
            if r.offered { "" } else { " (not offered)" },
            r.hints_sent,
            r.hints_honoured,
            r.io_cpu.map_or_else(|| "-".into(), |c| c.to_string()),
            r.io_moves
        );
        for q in &r.queues {
            let _ = write!(
                s,
                " | dev {} q {}: irqs by vcpu {:?}, co-located {}, last hint cpu {} -> vcpus {:?}",
                q.device,
                q.queue,
                q.irqs_by_vcpu,
                q.irqs_colocated,
                q.last_host_cpu.unwrap_or(-1),
                q.last_vcpus
            );
        }
        s
    }
}
