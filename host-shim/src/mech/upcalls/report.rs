//! M3's part of the stats JSON (`"upcalls"`) and of the summary, and the
//! delivery policy it reports (`--upcalls`).

use std::collections::BTreeMap;

use serde::Serialize;

/// How a pending upcall waits for a closed window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Arm `request_interrupt_window` and inject at `KVM_EXIT_IRQ_WINDOW_OPEN`.
    #[default]
    Window,
    /// The naive comparison: no window request; a poller thread kicks a vCPU
    /// with a waiting upcall every `POLL_INTERVAL` (signal + `immediate_exit`),
    /// and IF is looked at again at each of those exits (or any other), until
    /// it is found set.
    Poll,
    /// No upcalls offered (the CLI's `--upcalls off`).
    Off,
}

impl std::str::FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "window" => Ok(Self::Window),
            "poll" => Ok(Self::Poll),
            "off" => Ok(Self::Off),
            _ => Err(format!("unknown upcall delivery {s:?} (window|poll|off)")),
        }
    }
}

/// `upcalls` in the stats JSON.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UpcallReport {
    pub offered: bool,
    pub delivery: Delivery,
    /// Upcalls posted, per class name.
    pub requested: BTreeMap<&'static str, u64>,
    /// Upcalls the guest acknowledged (read back from its mailboxes), per class.
    pub delivered: BTreeMap<&'static str, u64>,
    /// Injections while the window was open at the post.
    pub injected_immediately: u64,
    /// Injections at an interrupt-window exit (or after, when another exit came first).
    pub injected_after_window: u64,
    /// Injections of the polling path after the window was found closed.
    pub injected_after_poll: u64,
    /// `KVM_EXIT_IRQ_WINDOW_OPEN` exits taken while upcalls waited.
    pub irq_window_exits: u64,
    /// Polling path: entries with `immediate_exit` because IF was clear.
    pub poll_reentries: u64,
    /// `KVM_INTERRUPT` refused because an interrupt was still queued (retried).
    pub inject_busy: u64,
    /// Posts that needed no kick: the vCPU already waited for its window.
    pub kicks_saved: u64,
    /// Times a vCPU stop waited for its interrupt window (scheduling use).
    pub stop_deferrals: u64,
    pub latency_open: LatencyReport,
    pub latency_deferred: LatencyReport,
    pub rejected: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyReport {
    pub count: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
}

impl UpcallReport {
    /// One line for the shim's summary.
    #[must_use]
    pub fn summary_line(&self) -> String {
        let r = self;
        let sum = |m: &BTreeMap<&str, u64>| m.values().sum::<u64>();
        // The classes in use, as class requested/delivered.
        let classes: Vec<String> = r
            .requested
            .iter()
            .filter(|(c, n)| **n != 0 || r.delivered.get(*c).copied().unwrap_or(0) != 0)
            .map(|(c, n)| format!("{c} {n}/{}", r.delivered.get(c).copied().unwrap_or(0)))
            .collect();
        format!(
            "  upcalls ({:?}): requested {} delivered {} ({}) | injected now {} after window {} \
             after poll {} | irq-window exits {} poll re-entries {} kicks saved {} | stop deferrals {} | \
             latency open {} ns deferred {} ns (mean)",
            r.delivery,
            sum(&r.requested),
            sum(&r.delivered),
            if classes.is_empty() {
                "none".to_owned()
            } else {
                classes.join(", ")
            },
            r.injected_immediately,
            r.injected_after_window,
            r.injected_after_poll,
            r.irq_window_exits,
            r.poll_reentries,
            r.kicks_saved,
            r.stop_deferrals,
            r.latency_open.mean_ns,
            r.latency_deferred.mean_ns
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use para_abi::upcall::Class as UpcallClass;

    #[test]
    fn summary_names_the_classes_in_use() {
        let mut r = UpcallReport::default();
        for c in UpcallClass::ALL {
            r.requested.insert(c.name(), 0);
            r.delivered.insert(c.name(), 0);
        }
        assert!(r.summary_line().contains("(none)"));
        r.requested.insert("redesignation", 2);
        r.delivered.insert("redesignation", 1);
        r.requested.insert("hint_update", 3);
        r.delivered.insert("hint_update", 3);
        let line = r.summary_line();
        assert!(
            line.contains("requested 5 delivered 4 (hint_update 3/3, redesignation 2/1)"),
            "{line}"
        );
        assert!(!line.contains("ping"), "{line}");
    }
}
