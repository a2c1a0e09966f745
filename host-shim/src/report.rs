//! The run's report: per guest and per vCPU, and the human summary printed at exit.
//! The top of the crate's report types: each mechanism's own part of a guest's
//! report is declared in that mechanism's `report.rs` and filled through
//! [`Mechanism::report`](crate::mech::Mechanism::report).
//!
//! On this machine's KVM `io_exits` never moves, so the shim counts the exits it
//! handles itself; KVM's `exits` and `insn_emulation` are read alongside.
//!
//! # `--stats-json` schema
//!
//! ```text
//! {
//!   "shim_max_rss_kib": u64,                  // getrusage(2) ru_maxrss of the shim
//!   "log_lines_suppressed": u64,              // guest-triggered log lines held back
//!                                             // by the rate limits (loglimit.rs)
//!   "switch": {"forwarded": u64, "flooded": u64, "dropped_queue_full": u64, "runts": u64,
//!              "dropped_forged_source": u64, "dropped_flood_budget": u64,
//!              "mac_evicted": u64, "mac_aged_out": u64},
//!   "switch_ports": [{                        // per port, in port order
//!     "name": str, "mac": str | null,         // null: the TAP (an open port)
//!     "dropped": {"forged_source": u64, "flood_budget": u64, "queue_full": u64},
//!                                             // its frames dropped, by reason (non-zero)
//!     "inbox_dropped": u64                    // frames to it dropped at its full inbox
//!   }],
//!   "tap": {                                  // only with --tap
//!     "name": str, "rx_packets": u64, "rx_bytes": u64,   // TAP -> switch
//!     "tx_packets": u64, "tx_bytes": u64,                // switch -> TAP
//!     "dropped": {"too_short": u64, "too_long": u64, "write_failed": u64}
//!   },
//!   "monitors": [{                            // M1 monitor threads, one per host CPU
//!     "cpu": u32, "rings": u32,
//!     "spin_class": "idle" | "normal",        // --doorbell-spin-class (as applied)
//!     "idle_spins": u64,                      // spins begun at SCHED_IDLE
//!     "starved_boosts": u64,                  // raised by the watch after 1 ms starved
//!     "parks": u64,                           // sleeps until a kick (or the timeout)
//!     "served": u64                           // ring records and overflow entries consumed
//!   }],
//!   "guests": [{
//!     "name": str,
//!     "outcome": str,                         // "exit status 0", "triple fault ...", ...
//!     "exit_status": u32 | null,              // the exit hypercall's status
//!     "boot_ms": f64 | null,                  // shim start -> first console byte
//!     "boot_to_main_ms": f64 | null,          // shim start -> MainReached hypercall
//!     "boot_to_main_from_run_ms": f64 | null, // first KVM_RUN -> MainReached hypercall
//!     "guest_main_us": u64 | null,            // the guest's own PVH entry -> main (TSC)
//!     "run_ms": f64,                          // vCPU threads started -> guest ended
//!     "exits": u64,                           // KVM's `exits`, summed over the vCPUs
//!     "exits_by_reason": {                    // shim-seen exits by class, plus the rest
//!       "io": u64,          // port I/O: hypercalls, serial, PCI 0xCF8/0xCFC, legacy
//!       "mmio": u64,        // MMIO exits to the shim (ECAM, BARs, unmapped)
//!       "halt": u64, "irq_window": u64,
//!       "other": u64,       // any other exit the shim saw (signal kicks, shutdown...)
//!       "in_kernel": u64    // exits - the above: handled by KVM (ioeventfd, LAPIC...)
//!     },
//!     "notifications": {"trap": u64, "doorbell": u64},  // queue notifications by path:
//!                                             // trap = notify writes (ioeventfd/MMIO);
//!                                             // doorbell = doorbell.events + overflow
//!                                             // entries that rang a real queue
//!     "doorbell": {                           // M1 (all 0 with --doorbells off)
//!       "offered": bool,                      // the guest was offered a para region
//!       "events": u64,          // ring records run on a real device queue
//!       "sink_events": u64,     // ring records for device 0xFF (counted, dropped)
//!       "fallback_kicks": u64,  // trapping kicks (kick eventfd counts)
//!       "overflow_drained": u64,// overflow-set entries drained (each >= 1 event)
//!       "rejected": {reason: u64},  // bad_check, unknown_op, wrong_sequence,
//!                               // unknown_device, unknown_queue, unsupported_op,
//!                               // bad_kick; non-zero only
//!       "protected_writes": u64,// guest writes to read-only para pages (MMIO exits)
//!       "host_events": u64,     // events host threads posted through the
//!       "host_kicks": u64       // host-written range (--rx-handoff monitor), and
//!                               // the parked-monitor wake-ups they made
//!                               // (not in events: those are the guest's)
//!     },
//!     "ctrl": {                               // M4 (mech::ctrl::report::CtrlReport)
//!       "offered": bool, "shadow_changes": u64, "hypercall_writes": u64,
//!       "hypercall_reads": u64, "owned_writes_reported": u64,
//!       "applied_at_exit": u64, "mask_changes": u64, "msis_suppressed": u64,
//!       "traced_exits": u64, "rejected": {reason: u64}  // non-zero only
//!     },
//!     "vmq": {                                // M5, with --vmq on (mech::vmq::manager::VmqReport)
//!       "id": u32, "sent_immediate": u64, "sent_lazy": u64, "sent_doorbell": u64,
//!       "delivered_copy": u64, "delivered_remap": u64, "bytes_sent": u64,
//!       "received": u64, "bytes_received": u64, "remap_mmaps": u64,
//!       "drains": u64, "held": u64, "notifications": u64,
//!       "notifications_quiet": u64,           // of those, not sent: the guest asked for none
//!       "errors": {reason: u64},              // every reason, zeros included
//!       "bad_ring": u64, "remap_fragments": u64, "remap_fragment_limit": u64,
//!       "window_fresh_pages": u64,            // window pages handed out the first time
//!       "flush_calls": u64, "kick_flushes": u64, "full_flushes": u64,  // its flushes, by way and why
//!       "waits": u64, "waits_woken": u64,     // kick-page waits, those ended by an arrival
//!       "flush_waits": u64,                   // immediate flushes that waited too (not in waits)
//!       "delivered_at_flush": u64, "delivered_at_wait": u64,  // messages, by the drain
//!       "delivered_at_exit": u64, "delivered_at_worker": u64, // that delivered them
//!       "delivered_at_monitor": u64,          // (monitor: the doorbell policy, run to completion)
//!       "bad_kicks": u64                      // kick-page reads and odd-size stores
//!     },
//!     "marks": [{                             // StatsMark hypercalls, in order
//!       "label": u64,                         // the guest's RBX
//!       "exits": u64,                         // KVM `exits` over all vCPUs then
//!       "host_irq_exits": u64,                // of them, KVM `irq_exits` (host interrupts)
//!       "doorbell_events": u64, "sink_events": u64  // doorbell counters then
//!     }],                                     // the first 1024 (counters::MARKS_KEPT)
//!     "marks_dropped": u64,                   // StatsMark calls beyond them
//!     "vcpus": [{
//!       "index": u32, "host_cpu": i32,        // sched_getcpu(3) at the last entry
//!       "exits": {Exit::name(): u64},         // non-zero shim counters only
//!       "shim_exits_total": u64,
//!       "kvm": {KVM_FIELDS name: u64},        // KVM binary stats at the vCPU's end
//!       "interrupts_injected": u64,           // KVM_INTERRUPT injections
//!       "preempted": u64, "preempt_deferred": u64  // --vcpu-quantum yields, deferrals
//!     }],
//!     "rejected": {Reject::name(): u64},      // refused guest input, non-zero only
//!     "nics": [{
//!       "name": str, "mac": "02:45:58:00:00:00",
//!       "tx_packets": u64, "tx_bytes": u64, "rx_packets": u64, "rx_bytes": u64,
//!       "queue_notifications": {"rx": u64, "tx": u64},
//!       "interrupts": u64                     // MSI-X messages delivered
//!     }]
//!   }]
//! }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::counters::{Exit, MarkReport};
use crate::mech::ctrl::report::CtrlReport;
use crate::mech::doorbell::report::{DoorbellReport, MonitorReport};
use crate::mech::hints::report::HintsReport;
use crate::mech::upcalls::report::UpcallReport;
use crate::mech::vmq::manager::VmqReport;

/// The classes of `exits_by_reason`, in report order; `in_kernel` is the rest.
pub const EXIT_CLASSES: [&str; 6] = ["io", "mmio", "halt", "irq_window", "other", "in_kernel"];

/// Folds a guest's per-vCPU shim exit counts (by [`Exit::name`]) into the classes
/// of [`EXIT_CLASSES`]; `in_kernel` = `kvm_exits` − the shim-seen ones (never below 0:
/// a kick can return from `KVM_RUN` before the guest ran, which KVM does not count).
#[must_use]
pub fn exits_by_reason<'a>(
    shim: impl IntoIterator<Item = &'a BTreeMap<&'static str, u64>>,
    kvm_exits: u64,
) -> BTreeMap<&'static str, u64> {
    let mut out: BTreeMap<&'static str, u64> = EXIT_CLASSES.iter().map(|&c| (c, 0)).collect();
    for per_vcpu in shim {
        for &e in Exit::ALL {
            if let (Some(class), Some(&n)) = (e.class(), per_vcpu.get(e.name())) {
                *out.entry(class).or_default() += n;
            }
        }
    }
    let seen: u64 = out.values().sum();
    out.insert("in_kernel", kvm_exits.saturating_sub(seen));
    out
}

#[derive(Debug, Default, Serialize)]
pub struct VcpuReport {
    pub index: u32,
    pub host_cpu: i32,
    pub exits: BTreeMap<&'static str, u64>,
    pub shim_exits_total: u64,
    pub kvm: BTreeMap<&'static str, u64>,
    pub interrupts_injected: u64,
    /// `--vcpu-quantum`: yields taken, and those put off while IF was 0.
    pub preempted: u64,
    pub preempt_deferred: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct NicReport {
    pub name: String,
    pub mac: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub queue_notifications: BTreeMap<String, u64>,
    pub interrupts: u64,
    /// MSI-X route changes applied, and those put off by the rate limit.
    pub msix_route_changes: u64,
    pub msix_route_changes_deferred: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct GuestReport {
    pub name: String,
    pub outcome: String,
    pub exit_status: Option<u32>,
    /// Shim start → the guest's first console byte, in ms.
    pub boot_ms: Option<f64>,
    /// Shim start → the guest's `MainReached` hypercall, in ms.
    pub boot_to_main_ms: Option<f64>,
    /// The guest's first `KVM_RUN` → its `MainReached` hypercall, in ms.
    pub boot_to_main_from_run_ms: Option<f64>,
    /// What the guest said in `MainReached`: µs from its PVH entry by its own TSC.
    pub guest_main_us: Option<u64>,
    pub run_ms: f64,
    /// KVM's `exits` summed over the guest's vCPUs for the whole run.
    pub exits: u64,
    /// `exits` split by [`EXIT_CLASSES`] (see [`exits_by_reason`]).
    pub exits_by_reason: BTreeMap<&'static str, u64>,
    /// The guest's queue notifications by path: `trap` (ioeventfd or MMIO exit),
    /// `doorbell` (M1; 0 until the shim offers it).
    pub notifications: BTreeMap<&'static str, u64>,
    pub vcpus: Vec<VcpuReport>,
    pub rejected: BTreeMap<&'static str, u64>,
    pub nics: Vec<NicReport>,
    /// Doorbell counters (M1).
    pub doorbell: DoorbellReport,
    /// Interrupt-vCPU hint counters (M2), when offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hints: Option<HintsReport>,
    /// `StatsMark` snapshots, in order: the first `counters::MARKS_KEPT`.
    pub marks: Vec<MarkReport>,
    /// `StatsMark` calls beyond those, counted and not kept.
    pub marks_dropped: u64,
    /// M3 upcall counters, when offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upcalls: Option<UpcallReport>,
    /// Shadowed control flags (M4).
    pub ctrl: CtrlReport,
    /// VM-queue counters (M5), when the shim offers VM queues.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmq: Option<VmqReport>,
    /// Mechanisms without a field of their own above: each one's part of the
    /// JSON under its key, beside the others' (empty for M1–M5).
    #[serde(flatten)]
    pub other: BTreeMap<&'static str, serde_json::Value>,
    /// Those mechanisms' lines in the summary.
    #[serde(skip)]
    pub other_summary: Vec<String>,
}

impl GuestReport {
    /// Fills `exits`, `exits_by_reason` and `notifications` from `vcpus` and `nics`.
    pub fn derive_totals(&mut self) {
        self.exits = self
            .vcpus
            .iter()
            .map(|v| v.kvm.get("exits").copied().unwrap_or(0))
            .sum();
        self.exits_by_reason = exits_by_reason(self.vcpus.iter().map(|v| &v.exits), self.exits);
        let trap = self
            .nics
            .iter()
            .flat_map(|n| n.queue_notifications.values())
            .sum();
        let doorbell = self.doorbell.events + self.doorbell.overflow_notified;
        self.notifications = [("trap", trap), ("doorbell", doorbell)]
            .into_iter()
            .collect();
    }
}

/// The version of the stats document (`--stats-json`, the API's stats):
/// raised whenever a key changes meaning or goes away; new keys may come
/// without it. docs/json.md describes each version's keys.
pub const STATS_SCHEMA_VERSION: u32 = 1;

/// Serialises as [`STATS_SCHEMA_VERSION`], so that no report can carry another.
#[derive(Debug, Default, Clone, Copy)]
pub struct SchemaVersion;

impl Serialize for SchemaVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(STATS_SCHEMA_VERSION)
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub schema_version: SchemaVersion,
    pub guests: Vec<GuestReport>,
    pub shim_max_rss_kib: u64,
    /// Guest-triggered log lines the rate limits held back (`loglimit`).
    pub log_lines_suppressed: u64,
    /// The L2 switch's counters (forwarded, flooded, drops...).
    pub switch: BTreeMap<&'static str, u64>,
    /// The switch's drops per port, in port order.
    pub switch_ports: Vec<SwitchPortReport>,
    /// The host TAP port, when `--tap` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<TapReport>,
    /// The doorbell monitors, one per host CPU that has rings.
    pub monitors: Vec<MonitorReport>,
}

/// One switch port's drops.
#[derive(Debug, Default, Serialize)]
pub struct SwitchPortReport {
    /// The NIC's (`GUEST.net0`) or the TAP's name.
    pub name: String,
    /// The MAC a guest NIC's port is bound to; `null` for the TAP.
    pub mac: Option<String>,
    /// Frames this port sent that the switch dropped, by reason (non-zero
    /// only): `forged_source`, `flood_budget`, `queue_full`.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Frames to this port dropped at its full inbox, whoever sent them.
    pub inbox_dropped: u64,
}

/// Frames between the switch and the host TAP device.
#[derive(Debug, Default, Serialize)]
pub struct TapReport {
    pub name: String,
    /// Frames read from the TAP and sent into the switch.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames from the switch written to the TAP.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames dropped by reason (`too_short`, `too_long`, `write_failed`).
    pub dropped: BTreeMap<&'static str, u64>,
}

/// The shim's peak resident set size, from `getrusage` (kilobytes on Linux).
#[must_use]
pub fn max_rss_kib() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    if rc == 0 {
        u64::try_from(ru.ru_maxrss).unwrap_or(0)
    } else {
        0
    }
}

/// `k=v k=v ...` for a counter map.
fn pairs<K: std::fmt::Display, V: std::fmt::Display>(
    m: impl IntoIterator<Item = (K, V)>,
) -> String {
    m.into_iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Report {
    /// The human table printed at exit.
    #[must_use]
    #[allow(clippy::too_many_lines)] // one line per counter group, in print order
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "=== host-shim summary (max RSS {} KiB) ===",
            self.shim_max_rss_kib
        );
        for g in &self.guests {
            let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |b| format!("{b:.1} ms"));
            let _ = writeln!(
                s,
                "guest {}: {} | boot to main {} from shim start ({} from first KVM_RUN, \
                 guest TSC {}) | first console byte {} | ran {:.1} ms",
                g.name,
                g.outcome,
                ms(g.boot_to_main_ms),
                ms(g.boot_to_main_from_run_ms),
                ms(g.guest_main_us
                    .map(|u| Duration::from_micros(u).as_secs_f64() * 1e3)),
                ms(g.boot_ms),
                g.run_ms
            );
            let _ = writeln!(
                s,
                "  kvm exits {}: {} | queue notifications: {}",
                g.exits,
                pairs(&g.exits_by_reason),
                pairs(&g.notifications)
            );
            let _ = writeln!(
                s,
                "  {:<5} {:>5} {:>10} {:>10} {:>12} {:>8}  shim exits by reason",
                "vcpu", "cpu", "shim", "kvm exits", "insn_emul", "irqs"
            );
            for v in &g.vcpus {
                let _ = writeln!(
                    s,
                    "  {:<5} {:>5} {:>10} {:>10} {:>12} {:>8}  {}",
                    v.index,
                    v.host_cpu,
                    v.shim_exits_total,
                    v.kvm.get("exits").copied().unwrap_or(0),
                    v.kvm.get("insn_emulation").copied().unwrap_or(0),
                    v.interrupts_injected,
                    pairs(&v.exits)
                );
            }
            let (yields, deferred): (u64, u64) = g.vcpus.iter().fold((0, 0), |(a, b), v| {
                (a + v.preempted, b + v.preempt_deferred)
            });
            if yields + deferred > 0 {
                let _ = writeln!(
                    s,
                    "  vcpu quantum: {yields} yields, {deferred} put off until the interrupt window opened"
                );
            }
            if g.doorbell.offered {
                let d = &g.doorbell;
                let _ = writeln!(
                    s,
                    "  doorbell: events {} sink {} fallback kicks {} overflow drained {} \
                     protected writes {} host events {} (kicks {}) rejected {{{}}} | marks {}",
                    d.events,
                    d.sink_events,
                    d.fallback_kicks,
                    d.overflow_drained,
                    d.protected_writes,
                    d.host_events,
                    d.host_kicks,
                    pairs(&d.rejected),
                    g.marks.len()
                );
            }
            if let Some(u) = &g.upcalls {
                let _ = writeln!(s, "{}", u.summary_line());
            }
            if let Some(h) = &g.hints {
                let _ = writeln!(s, "  {}", h.summary());
            }
            if let Some(line) = g.ctrl.summary_line() {
                s.push_str(&line);
            }
            for line in &g.other_summary {
                let _ = writeln!(s, "  {line}");
            }
            for n in &g.nics {
                let notes: u64 = n.queue_notifications.values().sum();
                let _ = writeln!(
                    s,
                    "  nic {} {}: tx {} pkts/{} B, rx {} pkts/{} B, notifications {}, interrupts {}",
                    n.name,
                    n.mac,
                    n.tx_packets,
                    n.tx_bytes,
                    n.rx_packets,
                    n.rx_bytes,
                    notes,
                    n.interrupts
                );
            }
            if !g.rejected.is_empty() {
                let _ = writeln!(s, "  rejected/ignored guest input: {}", pairs(&g.rejected));
            }
        }
        if !self.switch.is_empty() {
            let _ = writeln!(s, "switch: {}", pairs(&self.switch));
        }
        if let Some(t) = &self.tap {
            let _ = writeln!(
                s,
                "tap {}: from host {} pkts/{} B, to host {} pkts/{} B, dropped {}",
                t.name,
                t.rx_packets,
                t.rx_bytes,
                t.tx_packets,
                t.tx_bytes,
                pairs(&t.dropped)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_known() {
        assert!(max_rss_kib() > 0);
    }

    #[test]
    fn summary_mentions_guest_and_rss() {
        let r = Report {
            guests: vec![GuestReport {
                name: "a".into(),
                outcome: "exit 0".into(),
                boot_ms: Some(1.5),
                ..Default::default()
            }],
            shim_max_rss_kib: 1234,
            log_lines_suppressed: 0,
            ..Default::default()
        };
        let s = r.summary();
        assert!(s.contains("guest a: exit 0 | boot to main -"), "{s}");
        assert!(s.contains("first console byte 1.5 ms"), "{s}");
        assert!(s.contains("1234 KiB"));
    }

    #[test]
    fn exits_fold_into_classes_and_the_rest_is_in_kernel() {
        let v0: BTreeMap<&'static str, u64> = [
            ("io_out", 10),
            ("hypercall", 4), // part of io_out: not counted twice
            ("io_in", 1),
            ("mmio_write", 5),
            ("hlt", 2),
            ("irq_window_open", 1),
            ("intr", 3),
        ]
        .into_iter()
        .collect();
        let v1: BTreeMap<&'static str, u64> = [("mmio_read", 2)].into_iter().collect();
        let c = exits_by_reason([&v0, &v1], 100);
        assert_eq!(
            c.keys().copied().collect::<Vec<_>>().len(),
            EXIT_CLASSES.len()
        );
        assert_eq!(
            (c["io"], c["mmio"], c["halt"], c["irq_window"], c["other"]),
            (11, 7, 2, 1, 3)
        );
        assert_eq!(c["in_kernel"], 100 - 24);
        // KVM counting fewer than the shim saw never goes negative.
        assert_eq!(exits_by_reason([&v0], 1)["in_kernel"], 0);
    }

    #[test]
    fn every_exit_counter_has_a_class_but_hypercall() {
        for &e in Exit::ALL {
            assert_eq!(e.class().is_none(), e == Exit::Hypercall, "{e:?}");
            if let Some(c) = e.class() {
                assert!(EXIT_CLASSES.contains(&c));
            }
        }
    }

    /// The JSON the demo and xtask read: field names and types (schema in the module doc).
    #[test]
    fn json_shape() {
        let mut g = GuestReport {
            name: "cli".into(),
            outcome: "exit status 0".into(),
            exit_status: Some(0),
            boot_ms: Some(3.0),
            boot_to_main_ms: Some(9.5),
            boot_to_main_from_run_ms: Some(4.0),
            guest_main_us: Some(3900),
            vcpus: vec![VcpuReport {
                exits: [("io_out", 7), ("mmio_write", 3)].into_iter().collect(),
                kvm: [("exits", 50)].into_iter().collect(),
                ..Default::default()
            }],
            nics: vec![NicReport {
                name: "cli-net0".into(),
                tx_packets: 5,
                rx_packets: 6,
                queue_notifications: [("rx".into(), 2), ("tx".into(), 5)].into_iter().collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        g.doorbell = DoorbellReport {
            offered: true,
            events: 4,
            sink_events: 10,
            overflow_notified: 1,
            rejected: [("bad_check", 2)].into_iter().collect(),
            ..Default::default()
        };
        g.marks = vec![MarkReport {
            label: 1,
            exits: 9,
            host_irq_exits: 0,
            doorbell_events: 0,
            sink_events: 3,
            unix_ms: 1,
        }];
        g.derive_totals();
        let r = Report {
            guests: vec![g],
            shim_max_rss_kib: 1,
            log_lines_suppressed: 0,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["schema_version"], STATS_SCHEMA_VERSION);
        assert!(v.get("tap").is_none(), "no tap key without --tap");
        let g = &v["guests"][0];
        assert_eq!(g["exits"], 50);
        let by = g["exits_by_reason"].as_object().unwrap();
        let mut keys: Vec<&str> = by.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["halt", "in_kernel", "io", "irq_window", "mmio", "other"]
        );
        assert_eq!((by["io"].as_u64(), by["mmio"].as_u64()), (Some(7), Some(3)));
        assert_eq!(by["in_kernel"], 40);
        assert_eq!(
            g["notifications"],
            serde_json::json!({"trap": 7, "doorbell": 5})
        );
        assert_eq!(
            g["doorbell"],
            serde_json::json!({"offered": true, "events": 4, "sink_events": 10,
                "fallback_kicks": 0, "overflow_drained": 0,
                "rejected": {"bad_check": 2}, "protected_writes": 0,
                "host_events": 0, "host_kicks": 0})
        );
        assert_eq!(
            g["marks"],
            serde_json::json!([{"label": 1, "exits": 9, "host_irq_exits": 0, "doorbell_events": 0, "sink_events": 3, "unix_ms": 1}])
        );
        assert!(r.summary().contains("doorbell: events 4 sink 10"));
        assert_eq!(g["boot_to_main_ms"], 9.5);
        assert_eq!(g["boot_to_main_from_run_ms"], 4.0);
        assert_eq!(g["guest_main_us"], 3900);
        assert_eq!(g["boot_ms"], 3.0);
        assert_eq!(g["exit_status"], 0);
        assert_eq!(g["nics"][0]["tx_packets"], 5);
        assert_eq!(g["nics"][0]["rx_packets"], 6);
        assert!(g["vcpus"][0]["kvm"]["exits"].is_u64());
        let with_tap = Report {
            tap: Some(TapReport {
                name: "tap0".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&with_tap).unwrap();
        assert_eq!(v["tap"]["name"], "tap0");
        assert!(v["tap"]["rx_packets"].is_u64());
    }

    #[test]
    fn other_mechanisms_report_under_their_key() {
        // A mechanism without a field of its own: its key beside the others.
        let mut g = GuestReport::default();
        g.other
            .insert("sixth", serde_json::json!({"offered": true}));
        g.other_summary.push("sixth: offered".into());
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["sixth"]["offered"], true);
        assert!(v.get("other").is_none() && v.get("other_summary").is_none());
        let r = Report {
            guests: vec![g],
            ..Default::default()
        };
        assert!(
            r.summary().contains("\n  sixth: offered\n"),
            "{}",
            r.summary()
        );
    }
}
