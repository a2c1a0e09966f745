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
                 mask changes {} msis suppressed {} rejected {{{}}}\n",
                self.shadow_changes,
                self.hypercall_writes,
                self.owned_writes_reported,
                self.applied_at_exit,
                self.mask_changes,
                self.msis_suppressed,
                rejected.join(" ")
            )
        })
    }
}
