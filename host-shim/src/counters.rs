//! Counters every part of the shim shares: why a vCPU came back ([`Exit`]), which
//! guest inputs were refused ([`Reject`] and each mechanism's own reasons), the one
//! way to declare such a set of reasons ([`crate::reasons!`]), with one rate-limited log
//! per reason ([`crate::loglimit`]), and the `StatsMark` records ([`Marks`]).
//!
//! It names only the leaf `loglimit`, so devices, PCI, mechanisms and the run loop
//! can all count into it.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::loglimit::LogLimit;

/// A closed set of named reasons, each with its own counter; declared with
/// [`crate::reasons!`].
pub trait Reason: Copy + 'static {
    /// Every reason, in report order.
    const ALL: &'static [Self];
    /// The key of this reason in the stats JSON.
    fn name(self) -> &'static str;
    /// The position of this reason in [`Reason::ALL`].
    fn index(self) -> usize;
}

/// Declares a fieldless enum of counted reasons: `ALL`, `name()` and [`Reason`].
#[macro_export]
macro_rules! reasons {
    ($(#[$m:meta])* $vis:vis $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name { $($(#[$vm])* $v,)* }
        impl $name {
            pub const ALL: &[$name] = &[$($name::$v,)*];
            #[must_use]
            pub const fn name(self) -> &'static str { match self { $($name::$v => $s,)* } }
        }
        impl $crate::counters::Reason for $name {
            const ALL: &'static [Self] = $name::ALL;
            fn name(self) -> &'static str { $name::name(self) }
            fn index(self) -> usize { self as usize }
        }
    };
}

/// One atomic counter per reason of `R`, and one log limit per reason: a
/// flood of one reason neither floods the log nor hides another reason.
#[derive(Debug)]
pub struct Tally<R: Reason> {
    counts: Box<[AtomicU64]>,
    limits: Box<[LogLimit]>,
    reasons: PhantomData<R>,
}

impl<R: Reason> Default for Tally<R> {
    fn default() -> Self {
        Self {
            counts: R::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            limits: R::ALL.iter().map(|_| LogLimit::default()).collect(),
            reasons: PhantomData,
        }
    }
}

impl<R: Reason> Tally<R> {
    /// Counts one `r`.
    pub fn bump(&self, r: R) {
        if let Some(c) = self.counts.get(r.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[must_use]
    pub fn count(&self, r: R) -> u64 {
        self.counts
            .get(r.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The sum over every reason.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Every reason by name, zeros included.
    #[must_use]
    pub fn all(&self) -> BTreeMap<&'static str, u64> {
        R::ALL.iter().map(|&r| (r.name(), self.count(r))).collect()
    }

    /// The non-zero counts by name.
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        R::ALL
            .iter()
            .map(|&r| (r.name(), self.count(r)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// The log limit of reason `r`, for a caller that logs `r` in its own
    /// words through [`crate::guest_log!`].
    #[must_use]
    pub fn limit(&self, r: R) -> &LogLimit {
        &self.limits[r.index()]
    }

    /// Counts a refused guest input and logs it as "`what_for`: rejected
    /// `what`" through its reason's log limit.
    pub fn reject(&self, r: R, guest: &str, what_for: &str, what: std::fmt::Arguments<'_>) {
        self.bump(r);
        crate::guest_log!(
            warn,
            limit = self.limit(r),
            guest,
            reason = r.name(),
            "{what_for}: rejected {what}"
        );
    }
}

reasons! {
    /// Why a vCPU came back to the shim.
    pub Exit {
        IoIn => "io_in",
        IoOut => "io_out",
        MmioRead => "mmio_read",
        MmioWrite => "mmio_write",
        Hypercall => "hypercall",
        IrqWindow => "irq_window_open",
        Hlt => "hlt",
        Shutdown => "shutdown",
        Intr => "intr",
        Eagain => "eagain",
        SystemEvent => "system_event",
        InternalError => "internal_error",
        Other => "other",
    }
}

reasons! {
    /// Guest inputs the shim refused or ignored: every one is counted.
    pub Reject {
        UnknownHypercall => "unknown_hypercall",
        UnknownPort => "unknown_port",
        UnmappedMmio => "unmapped_mmio",
        LegacyPic => "legacy_pic_access",
        LegacyPit => "legacy_pit_access",
        PciConfigReadOnly => "pci_config_ro_write",
        PciConfigBadAccess => "pci_config_bad_access",
        BarRelocation => "pci_bar_relocation",
        MsixBadAccess => "msix_bad_access",
        VirtioBadRegister => "virtio_bad_register",
        VirtioBadQueue => "virtio_bad_queue_config",
        VirtioBadDescriptor => "virtio_bad_descriptor",
        VirtioAvailJump => "virtio_avail_index_jump",
        VirtioNoRxBuffer => "virtio_rx_dropped_no_buffer",
        FrameTooBig => "frame_too_big",
        ConsoleBadBuffer => "console_bad_buffer",
        DebugBadFrame => "debug_bad_frame",
        SerialBadAccess => "serial_bad_access",
    }
}

pub type ExitCounters = Tally<Exit>;
pub type RejectCounters = Tally<Reject>;

impl Exit {
    /// The demo's reason class of this exit (`exits_by_reason` in the JSON), or `None`
    /// for counters that refine another one (a hypercall is also an `io_out`).
    #[must_use]
    pub const fn class(self) -> Option<&'static str> {
        match self {
            Self::IoIn | Self::IoOut => Some("io"),
            Self::MmioRead | Self::MmioWrite => Some("mmio"),
            Self::Hlt => Some("halt"),
            Self::IrqWindow => Some("irq_window"),
            Self::Hypercall => None,
            Self::Shutdown
            | Self::Intr
            | Self::Eagain
            | Self::SystemEvent
            | Self::InternalError
            | Self::Other => Some("other"),
        }
    }
}

/// One `StatsMark` hypercall: the guest's counters at that moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MarkReport {
    pub label: u64,
    /// KVM's `exits` summed over the guest's vCPUs.
    pub exits: u64,
    /// Of those, KVM's `irq_exits`: a host interrupt came while a vCPU ran
    /// guest code (the guest neither causes nor can avoid them).
    pub host_irq_exits: u64,
    pub doorbell_events: u64,
    pub sink_events: u64,
    /// Wall-clock time of the mark, ms since the Unix epoch: orders marks of
    /// different guests of one run.
    pub unix_ms: u64,
}

/// The most `StatsMark` records one guest keeps: a guest that marks in a
/// loop must not grow the shim's memory and stats file without bound.
pub const MARKS_KEPT: usize = 1024;

/// A guest's `StatsMark` records: the first [`MARKS_KEPT`], and a count of
/// the ones dropped after them.
#[derive(Debug, Default)]
pub struct Marks {
    kept: Mutex<Vec<MarkReport>>,
    dropped: AtomicU64,
}

impl Marks {
    /// Keeps `m` while there is room; else counts it as dropped (false).
    pub fn record(&self, m: MarkReport) -> bool {
        let mut kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < MARKS_KEPT {
            kept.push(m);
            true
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// The records kept, in the order they came.
    #[must_use]
    pub fn kept(&self) -> Vec<MarkReport> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records dropped for want of room.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_rejects_is_counted_in_full_and_logged_through_its_limit() {
        let r = RejectCounters::default();
        for i in 0..10_000 {
            r.reject(Reject::UnknownPort, "g", "test", format_args!("port {i}"));
        }
        assert_eq!(r.count(Reject::UnknownPort), 10_000);
        // The burst went to the log: this reason's limit is spent, another's not.
        assert_eq!(r.limit(Reject::UnknownPort).allow(), None);
        assert!(r.limit(Reject::UnmappedMmio).allow().is_some());
    }

    #[test]
    fn marks_are_bounded_and_the_dropped_ones_counted() {
        let marks = Marks::default();
        for label in 0..MARKS_KEPT as u64 + 5 {
            marks.record(MarkReport {
                label,
                ..MarkReport::default()
            });
        }
        let kept = marks.kept();
        assert_eq!(kept.len(), MARKS_KEPT);
        assert_eq!(
            kept[0].label, 0,
            "the first ones stay: labels are looked up first-come"
        );
        assert_eq!(marks.dropped(), 5);
    }

    #[test]
    fn counters_count_and_snapshot_skips_zero() {
        let c = ExitCounters::default();
        c.bump(Exit::IoOut);
        c.bump(Exit::IoOut);
        c.bump(Exit::Hlt);
        assert_eq!(c.total(), 3);
        let s = c.snapshot();
        assert_eq!(s.get("io_out"), Some(&2));
        assert_eq!(s.get("hlt"), Some(&1));
        assert!(!s.contains_key("mmio_read"));
        let r = RejectCounters::default();
        r.bump(Reject::UnknownHypercall);
        assert_eq!(r.count(Reject::UnknownHypercall), 1);
        assert_eq!(r.count(Reject::UnmappedMmio), 0);
        assert_eq!(r.all().len(), Reject::ALL.len());
    }

    #[test]
    fn names_are_unique() {
        let mut n: Vec<_> = Exit::ALL
            .iter()
            .map(|e| e.name())
            .chain(Reject::ALL.iter().map(|r| r.name()))
            .collect();
        let len = n.len();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), len);
    }
}
