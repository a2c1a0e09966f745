//! Typed mirrors of the JSON the host shim writes with `--stats-json FILE`
//! (its schema is documented in `host-shim/src/stats.rs`).
//!
//! Each struct names only the keys xtask reads, so counters added to the shim
//! are tolerated; but a key named here that the shim stops writing, or writes
//! under another name, fails the parse with an error naming it. A renamed
//! counter must break a run loudly: read as zero, a check like
//! `rejected == 0` would pass.
//!
//! The rules the fields follow:
//! - a plain field is a key the shim always writes;
//! - `Option` with [`present`] is a key the shim always writes, possibly as
//!   `null`;
//! - `Option` with `#[serde(default)]` is a key the shim leaves out when the
//!   mechanism was not offered;
//! - a map, or a field with `#[serde(default)]` inside a map's mirror, is a set
//!   the shim writes with its non-zero entries only.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

/// Deserializes an `Option` whose key must be there (its value may be `null`).
/// Without it serde would read a missing key as `None`.
pub fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::deserialize(d)
}

/// The whole document.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ShimStats {
    /// The shim's `STATS_SCHEMA_VERSION`; this mirror reads version 1.
    #[serde(deserialize_with = "schema_v1")]
    pub schema_version: u32,
    pub guests: Vec<GuestStats>,
    /// The shim's peak resident set (`getrusage`), KiB.
    pub shim_max_rss_kib: u64,
    /// The switch's counters by name (`forwarded`, `dropped_queue_full`...).
    pub switch: BTreeMap<String, u64>,
    /// The switch's drops per port, in port order.
    pub switch_ports: Vec<SwitchPortStats>,
    /// The host TAP port, when the shim ran with `--tap`.
    #[serde(default)]
    pub tap: Option<TapStats>,
    /// The doorbell monitors, one per host CPU that had rings.
    #[serde(default)]
    pub monitors: Vec<MonitorStats>,
}

/// `monitors[]`: one doorbell monitor thread.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MonitorStats {
    pub cpu: usize,
    pub rings: usize,
    /// Ring records and overflow entries it consumed.
    #[serde(default)]
    pub served: u64,
}

/// `tap`: frames between the switch and the host's TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TapStats {
    /// Frames read from the TAP into the switch.
    pub rx_packets: u64,
    /// Frames from the switch written to the TAP.
    pub tx_packets: u64,
    /// Frames dropped by reason (non-zero only).
    pub dropped: BTreeMap<String, u64>,
}

/// One entry of `switch_ports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SwitchPortStats {
    /// `GUEST.net0` for a guest NIC, the TAP's name for the TAP.
    pub name: String,
    /// Frames this port sent that the switch dropped, by reason (non-zero only).
    pub dropped: BTreeMap<String, u64>,
    /// Frames to this port dropped at its full inbox.
    pub inbox_dropped: u64,
}

/// The stats schema version this mirror reads.
pub const STATS_SCHEMA_VERSION: u32 = 1;

fn schema_v1<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == STATS_SCHEMA_VERSION {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "schema_version {v}: this xtask reads host-shim stats version {STATS_SCHEMA_VERSION} (rebuild both from one checkout)"
        )))
    }
}

impl ShimStats {
    /// Parses the document; the error names the key that did not fit.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads and parses `path`: `Ok(None)` when the shim wrote no file (it
    /// failed before its report), `Err` naming the key when the file does not
    /// parse.
    pub fn read(path: &Path) -> Result<Option<Self>, String> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(None);
        };
        Self::parse(&text)
            .map(Some)
            .map_err(|e| format!("host-shim stats {} do not parse: {e}", path.display()))
    }

    /// Guest `name`'s entry.
    #[must_use]
    pub fn guest(&self, name: &str) -> Option<&GuestStats> {
        self.guests.iter().find(|g| g.name == name)
    }
}

/// One guest's entry in `guests`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GuestStats {
    pub name: String,
    /// The shim's account of how the guest ended ("exit status 0", "triple fault ...").
    pub outcome: String,
    /// The exit hypercall's status; `null` when the guest never made it.
    #[serde(deserialize_with = "present")]
    pub exit_status: Option<u32>,
    /// Shim start to the guest's `MainReached` hypercall.
    #[serde(deserialize_with = "present")]
    pub boot_to_main_ms: Option<f64>,
    /// KVM's `exits` summed over the guest's vCPUs.
    pub exits: u64,
    pub exits_by_reason: ExitsByReason,
    pub notifications: Notifications,
    pub vcpus: Vec<VcpuStats>,
    pub nics: Vec<NicStats>,
    pub doorbell: DoorbellStats,
    /// `StatsMark` snapshots, in the order the guest made them.
    pub marks: Vec<Mark>,
    /// `StatsMark` calls beyond those the shim keeps.
    pub marks_dropped: u64,
    /// Refused exits and device accesses by reason (non-zero only).
    pub rejected: BTreeMap<String, u64>,
    /// Shadowed control flags (M4).
    pub ctrl: CtrlStats,
    /// Interrupt-vCPU hints, when the shim kept them.
    #[serde(default)]
    pub hints: Option<HintsStats>,
    /// Upcall counters, when the shim offered upcalls.
    #[serde(default)]
    pub upcalls: Option<UpcallStats>,
    /// VM-queue counters, when the shim offered VM queues.
    #[serde(default)]
    pub vmq: Option<VmqStats>,
    /// Direct-channel counters, when the shim offered direct channels.
    #[serde(default)]
    pub direct: Option<DirectStats>,
}

/// `direct`: the guest's channels and the host's part in them (wake-ups).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DirectStats {
    /// Channels to other guests.
    pub channels: u64,
    /// Wake-ups the guest asked the host to give a sleeping peer.
    pub wakes_sent: u64,
    /// Wake-ups the host gave the guest.
    pub wakes_received: u64,
    /// Refused accesses and requests by reason (non-zero only).
    pub refused: BTreeMap<String, u64>,
}

impl GuestStats {
    /// The mark with `label` (the `StatsMark` hypercall's argument).
    #[must_use]
    pub fn mark(&self, label: u64) -> Option<&Mark> {
        self.marks.iter().find(|m| m.label == label)
    }

    /// Frames the guest's NICs sent.
    #[must_use]
    pub fn tx_packets(&self) -> u64 {
        self.nics.iter().map(|n| n.tx_packets).sum()
    }

    /// Frames the guest's NICs received.
    #[must_use]
    pub fn rx_packets(&self) -> u64 {
        self.nics.iter().map(|n| n.rx_packets).sum()
    }

    /// MSI-X messages the guest's NICs raised.
    #[must_use]
    pub fn interrupts(&self) -> u64 {
        self.nics.iter().map(|n| n.interrupts).sum()
    }

    /// Hypercall exits the shim handled, over the guest's vCPUs.
    #[must_use]
    pub fn hypercall_exits(&self) -> u64 {
        self.vcpus.iter().map(|v| v.exits.hypercall).sum()
    }

    /// `KVM_RUN` returns with EINTR (kicks), over the guest's vCPUs.
    #[must_use]
    pub fn intr_exits(&self) -> u64 {
        self.vcpus.iter().map(|v| v.exits.intr).sum()
    }

    /// `vcpus[].kvm` summed by statistic name.
    #[must_use]
    pub fn kvm_sums(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for v in &self.vcpus {
            for (k, x) in &v.kvm {
                *out.entry(k.clone()).or_insert(0) += x;
            }
        }
        out
    }
}

/// `exits_by_reason`: KVM's exits split by who handled them. Fields in key
/// order, so that `run --json` writes them as the shim does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ExitsByReason {
    pub halt: u64,
    /// The rest: exits KVM handled itself (ioeventfd, LAPIC...).
    pub in_kernel: u64,
    pub io: u64,
    pub irq_window: u64,
    pub mmio: u64,
    pub other: u64,
}

/// `notifications`: queue notifications by the path they took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Notifications {
    pub doorbell: u64,
    /// Writes to the virtio notify register (ioeventfd or MMIO exit).
    pub trap: u64,
}

impl Notifications {
    #[must_use]
    pub const fn total(self) -> u64 {
        self.doorbell + self.trap
    }
}

/// One entry of `vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VcpuStats {
    pub exits: ShimExits,
    /// KVM's binary statistics at the vCPU's end, by name.
    pub kvm: BTreeMap<String, u64>,
}

/// `vcpus[].exits`: the exits the shim handled, by reason. The shim writes
/// the non-zero ones only, so an absent key is a zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct ShimExits {
    #[serde(default)]
    pub hypercall: u64,
    #[serde(default)]
    pub intr: u64,
}

/// One entry of `nics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NicStats {
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// MSI-X messages delivered.
    pub interrupts: u64,
}

/// `ctrl`: the control-flag counters xtask reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CtrlStats {
    /// Refused guest input by reason (non-zero only).
    pub rejected: BTreeMap<String, u64>,
    /// The exitless wait's counters.
    #[serde(default)]
    pub wait: WaitStats,
}

/// `ctrl.wait`: the exitless wait's counters xtask reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct WaitStats {
    /// Waits (one exit each).
    #[serde(default)]
    pub waits: u64,
    /// Waits that carried NIC 0's TX notification instead of a doorbell.
    #[serde(default)]
    pub tx_carried: u64,
}

/// `doorbell`: the doorbell counters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DoorbellStats {
    /// Trapping kicks (a parked monitor woken by the kick eventfd).
    pub fallback_kicks: u64,
    pub overflow_drained: u64,
    /// Refused ring records by reason (non-zero only).
    pub rejected: BTreeMap<String, u64>,
    /// Stores into the region's read-only pages, refused.
    pub protected_writes: u64,
    /// Events host threads posted through the host-written range
    /// (`--rx-handoff monitor`), and the parked-monitor wake-ups they made.
    #[serde(default)]
    pub host_events: u64,
    #[serde(default)]
    pub host_kicks: u64,
    /// The notification benchmark's figures (`--notify-bench` only).
    #[serde(default)]
    pub notify_bench: Option<NotifyBench>,
}

/// `doorbell.notify_bench`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NotifyBench {
    /// Half the host-rdtsc bracket around the TSC-offset read.
    pub offset_error_cycles: u64,
    pub tsc_khz: u64,
    /// Per notification path.
    pub paths: BTreeMap<String, NotifyPath>,
}

/// `doorbell.notify_bench.paths.<id>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NotifyPath {
    /// Notifications the guest measured.
    pub guest_count: u64,
    /// Guest-side cost per notification.
    pub guest_ns: f64,
    /// Notifications the host observed.
    pub observed: u64,
    /// Notify to host observation, in order.
    pub latency_ns: Vec<f64>,
}

/// One entry of `marks`: the guest's counters at a `StatsMark` hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Mark {
    pub label: u64,
    /// KVM's `exits` over all vCPUs then.
    pub exits: u64,
    /// Of those, host interrupts taken while a vCPU ran (KVM's `irq_exits`).
    #[serde(default)]
    pub host_irq_exits: u64,
    pub sink_events: u64,
    /// Wall-clock time, ms since the Unix epoch.
    pub unix_ms: u64,
}

/// `hints`: interrupt-vCPU hint counters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HintsStats {
    /// Moves of the NIC I/O thread to another host CPU.
    pub io_moves: u64,
    /// Refused guest accesses by reason (non-zero only).
    pub rejected: BTreeMap<String, u64>,
    pub queues: Vec<QueueHints>,
}

/// `hints.queues[]`: one device queue's hints. Every key the shim writes, in
/// key order, because the checks print the record as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct QueueHints {
    pub device: u8,
    pub hints_announced: u64,
    pub hints_deferred: u64,
    pub hints_honoured: u64,
    pub hints_sent: u64,
    pub irqs_by_vcpu: Vec<u64>,
    pub irqs_colocated: u64,
    #[serde(deserialize_with = "present")]
    pub last_host_cpu: Option<i32>,
    pub last_vcpus: Vec<u32>,
    pub queue: u16,
}

/// `upcalls`: upcall counters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UpcallStats {
    pub offered: bool,
    pub requested: UpcallClasses,
    pub delivered: UpcallClasses,
    pub injected_after_window: u64,
    pub irq_window_exits: u64,
    pub latency_open: Latency,
    pub latency_deferred: Latency,
    /// Refused guest input by reason.
    pub rejected: BTreeMap<String, u64>,
}

/// `upcalls.requested` / `upcalls.delivered`: upcalls by class. The shim
/// writes every class; those xtask does not name are kept for the totals.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UpcallClasses {
    pub hint_update: u64,
    pub ping: u64,
    pub redesignation: u64,
    pub vmq_arrival: u64,
    #[serde(flatten)]
    pub others: BTreeMap<String, u64>,
}

impl UpcallClasses {
    /// Over every class.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.hint_update
            + self.ping
            + self.redesignation
            + self.vmq_arrival
            + self.others.values().sum::<u64>()
    }
}

/// `upcalls.latency_*`: request to delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Latency {
    pub mean_ns: u64,
}

/// `vmq`: VM-queue counters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmqStats {
    pub sent_immediate: u64,
    pub sent_lazy: u64,
    pub sent_doorbell: u64,
    pub received: u64,
    pub bytes_sent: u64,
    /// Drains stopped at a full destination.
    pub held: u64,
    pub errors: VmqErrors,
    /// The guest's own flushes as the shim counted them (absent from older
    /// shims' JSON: 0).
    #[serde(default)]
    pub flush_calls: u64,
    #[serde(default)]
    pub kick_flushes: u64,
    #[serde(default)]
    pub full_flushes: u64,
    /// Kick-page waits (exits made in place of a halt).
    #[serde(default)]
    pub waits: u64,
    /// Immediate flushes that waited in the same exit (not in `waits`).
    #[serde(default)]
    pub flush_waits: u64,
    /// Arrival notifications not sent because the guest asked for quiet.
    #[serde(default)]
    pub notifications_quiet: u64,
}

impl VmqStats {
    /// Messages sent under any policy.
    #[must_use]
    pub const fn sends(&self) -> u64 {
        self.sent_immediate + self.sent_lazy + self.sent_doorbell
    }
}

/// `vmq.errors`: refused sends by reason (every reason is written).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmqErrors {
    /// Sends refused because the peer had exited.
    pub vm_exited: u64,
    #[serde(flatten)]
    pub others: BTreeMap<String, u64>,
}

impl VmqErrors {
    /// Refused sends for any reason but a gone peer.
    #[must_use]
    pub fn not_vm_exited(&self) -> u64 {
        self.others.values().sum()
    }
}

/// A trimmed `--stats-json` written by the shim: the ping-pong server of
/// `cargo xtask run` and a ktest guest with VM queues and the notify bench.
#[cfg(test)]
pub const SAMPLE: &str = include_str!("../../tests/fixtures/shim-stats.json");

/// Guest `name` of [`SAMPLE`] (`server` or `ktest`), for tests to edit.
#[cfg(test)]
#[must_use]
pub fn sample(name: &str) -> GuestStats {
    ShimStats::parse(SAMPLE)
        .unwrap()
        .guest(name)
        .unwrap()
        .clone()
}

/// A [`Mark`] for tests.
#[cfg(test)]
#[must_use]
pub const fn mark(label: u64, exits: u64, sink_events: u64, unix_ms: u64) -> Mark {
    Mark {
        label,
        exits,
        host_irq_exits: 0,
        sink_events,
        unix_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shims_json_parses() {
        let s = ShimStats::parse(SAMPLE).unwrap();
        let server = s.guest("server").unwrap();
        assert_eq!(server.exit_status, Some(0));
        assert_eq!(server.outcome, "exit status 0");
        assert!(server.exits > 0);
        assert_eq!(
            server.exits,
            server.exits_by_reason.halt
                + server.exits_by_reason.in_kernel
                + server.exits_by_reason.io
                + server.exits_by_reason.irq_window
                + server.exits_by_reason.mmio
                + server.exits_by_reason.other
        );
        assert!(server.tx_packets() > 0 && server.rx_packets() > 0);
        assert!(server.hypercall_exits() > 0);
        assert!(server.hints.as_ref().is_some_and(|h| !h.queues.is_empty()));
        assert!(server.upcalls.as_ref().is_some_and(|u| u.offered));
        assert!(server.mark(0x7070_0001).is_some());
        assert!(server.vmq.is_none(), "not offered: no key");
        let ktest = s.guest("ktest").unwrap();
        let vmq = ktest.vmq.as_ref().unwrap();
        assert!(vmq.errors.others.contains_key("queue_full"));
        assert!(ktest.doorbell.notify_bench.is_some());
        assert!(s.guest("nobody").is_none());
    }

    /// Every key xtask reads, renamed in turn, fails the parse with an error
    /// naming it; extra keys do not.
    #[test]
    fn a_renamed_key_is_an_error_naming_it() {
        for key in [
            "exits",
            "exit_status",
            "boot_to_main_ms",
            "outcome",
            "in_kernel",
            "tx_packets",
            "fallback_kicks",
            "sink_events",
            "unix_ms",
            "io_moves",
            "hints_announced",
            "last_host_cpu",
            "irq_window_exits",
            "redesignation",
            "mean_ns",
            "sent_lazy",
            "vm_exited",
            "tsc_khz",
            "guest_count",
            "schema_version",
        ] {
            let quoted = format!("\"{key}\":");
            assert!(SAMPLE.contains(&quoted), "the sample has `{key}`");
            let renamed = SAMPLE.replace(&quoted, &format!("\"{key}_renamed\":"));
            let err = ShimStats::parse(&renamed)
                .expect_err(&format!("`{key}` renamed still parses"))
                .to_string();
            assert!(
                err.contains(&format!("missing field `{key}`")),
                "{key}: {err}"
            );
        }
        let extra = SAMPLE.replacen("\"exits\":", "\"a_new_counter\": 7, \"exits\":", 1);
        assert_eq!(
            ShimStats::parse(&extra).unwrap(),
            ShimStats::parse(SAMPLE).unwrap()
        );
    }

    #[test]
    fn another_schema_version_is_refused_by_name() {
        let v2 = SAMPLE.replacen("\"schema_version\": 1", "\"schema_version\": 2", 1);
        let err = ShimStats::parse(&v2).unwrap_err().to_string();
        assert!(err.contains("schema_version 2"), "{err}");
        assert_eq!(ShimStats::parse(SAMPLE).unwrap().schema_version, 1);
    }

    #[test]
    fn keys_the_shim_leaves_out_or_writes_non_zero_only() {
        let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        let g = &mut v["guests"][0];
        g.as_object_mut().unwrap().remove("upcalls");
        g["vcpus"][0]["exits"] = serde_json::json!({});
        g["exit_status"] = serde_json::Value::Null;
        let s: ShimStats = serde_json::from_value(v).unwrap();
        let g = &s.guests[0];
        assert!(g.upcalls.is_none());
        assert_eq!(g.vcpus[0].exits, ShimExits::default());
        assert_eq!(g.exit_status, None);
    }

    #[test]
    fn sums_over_nics_vcpus_and_classes() {
        let s = ShimStats::parse(SAMPLE).unwrap();
        let g = s.guest("server").unwrap();
        assert_eq!(
            g.kvm_sums()["exits"],
            g.vcpus.iter().map(|v| v.kvm["exits"]).sum::<u64>()
        );
        let u = g.upcalls.as_ref().unwrap();
        assert_eq!(u.requested.total(), u.requested.hint_update);
        let vmq = s.guest("ktest").unwrap().vmq.as_ref().unwrap();
        assert_eq!(
            vmq.errors.not_vm_exited(),
            vmq.errors.others.values().sum::<u64>()
        );
    }
}
