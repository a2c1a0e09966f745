//! M4's part of the stats JSON (`"ctrl"`) and of the summary.

use std::collections::BTreeMap;

use serde::Serialize;

/// M4 counters in the stats JSON (`"ctrl"`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CtrlReport {
    pub offered: bool,
    /// Flag changes the shim saw in shadow words at exits.
    pub shadow_changes: u64,
    /// Trapping writes (`CtrlWrite`).
    pub hypercall_writes: u64,
    pub hypercall_reads: u64,
    /// Real-register (owned) writes, as the guest reports them in its shadow records.
    pub owned_writes_reported: u64,
    /// Hardware flags the shim wrote into CR0 at an exit.
    pub applied_at_exit: u64,
    pub mask_changes: u64,
    pub msis_suppressed: u64,
    pub traced_exits: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    /// The exitless wait.
    pub wait: WaitReport,
}

/// M4's exitless wait in the stats JSON (`"ctrl": {"wait": ...}`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct WaitReport {
    /// Requests (one MMIO exit each).
    pub waits: u64,
    /// Returned at once: work had come since the guest looked.
    pub ready: u64,
    /// Woken by RX work or a kick.
    pub woken: u64,
    /// Ended by the guest's timeout or the shim's bound.
    pub timeouts: u64,
    /// Microseconds vCPU threads were held.
    pub held_us: u64,
    /// NIC 0 RX batches announced to the guest.
    pub rx_batches: u64,
    /// Waits that carried NIC 0's TX notification (frames queued without a
    /// doorbell, moved on before the vCPU was held).
    pub tx_carried: u64,
}

impl CtrlReport {
    /// The summary table's line, when offered.
    #[must_use]
    pub fn summary_line(&self) -> Option<String> {
        let rejected: Vec<String> = self
            .rejected
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        self.offered.then(|| {
            format!(
                "  ctrl: shadow changes {} hypercall writes {} owned writes {} applied at exit {} \
                 mask changes {} msis suppressed {} waits {} (ready {} woken {} timeouts {} \
                 carrying TX {}) rejected {{{}}}\n",
                self.shadow_changes,
                self.hypercall_writes,
                self.owned_writes_reported,
                self.applied_at_exit,
                self.mask_changes,
                self.msis_suppressed,
                self.wait.waits,
                self.wait.ready,
                self.wait.woken,
                self.wait.timeouts,
                self.wait.tx_carried,
                rejected.join(" ")
            )
        })
    }
}
