//! M1 on the host: exitless doorbells (`para_abi::doorbell`, `para_abi::region`).
//!
//! - [`manager`]: the memory instruction manager — the para region, designations,
//!   read-only/writable memslots, kick addresses.
//! - [`monitor`] (with [`idle_spin`] and [`waitpkg`]): one thread per host CPU
//!   consuming the rings designated to it.
//! - [`redesignate`] and [`bench`](mod@bench): run-time re-designation and the notification
//!   benchmark, for tests and measurements.
//! - [`report`]: M1's part of the stats JSON.
//! - here: what an event *means* for one guest ([`GuestDoorbells::event`]), the
//!   per-guest counters, the MMIO handler for guest writes that exit (the
//!   read-only pages, kicks of the wrong size), and [`Doorbells`], M1 as a
//!   guest's [`Mechanism`].

pub mod bench;
pub mod host_lane;
pub mod idle_spin;
pub mod manager;
pub mod monitor;
pub mod redesignate;
pub mod report;
pub mod waitpkg;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use para_abi::discovery::{self, features};
use para_abi::doorbell::device::{BENCH, SINK};
use para_abi::doorbell::ring::{Pending, RejectReason};
use para_abi::doorbell::{Event, Op};
use para_abi::hypercall::{Call, Status};
use para_abi::layout::{KICK_BASE, KICK_SPAN};
use vmm_sys_util::eventfd::EventFd;

use crate::counters::{MarkReport, Reject, Tally};
use crate::kvm::cpuid::Offer;
use crate::mech::{CallCtx, Mechanism, UpcallClass, Upcaller};
use crate::platform::MmioDevice;
use crate::reasons;
use crate::report::GuestReport;
use manager::ParaRegion;
use report::DoorbellReport;

reasons! {
    /// Why the host refused a doorbell record or write (the `doorbell.rejected` keys).
    pub Rejected {
        /// Check byte wrong: garbage or a torn (non-atomic) write.
        BadCheck => "bad_check",
        /// Operation field undefined.
        UnknownOp => "unknown_op",
        /// A record written for another ring position.
        WrongSequence => "wrong_sequence",
        /// No device with that PCI device number.
        UnknownDevice => "unknown_device",
        /// The device has no such queue.
        UnknownQueue => "unknown_queue",
        /// An operation the device does not take (`Custom` on a NIC).
        UnsupportedOp => "unsupported_op",
        /// A write in the kick window that is not a kick address.
        BadKick => "bad_kick",
    }
}

impl Rejected {
    #[must_use]
    pub const fn from_ring(r: RejectReason) -> Self {
        match r {
            RejectReason::BadCheck => Self::BadCheck,
            RejectReason::UnknownOp(_) => Self::UnknownOp,
            RejectReason::WrongSequence { .. } => Self::WrongSequence,
        }
    }
}

/// One guest's doorbell counters (all monotonic; read at marks and at the end).
#[derive(Debug, Default)]
pub struct Counters {
    /// Ring events that reached a real device queue.
    pub events: AtomicU64,
    /// Ring events for [`SINK`], counted and dropped.
    pub sink_events: AtomicU64,
    /// Entries taken from the overflow set (each stands for ≥ 1 coalesced event).
    pub overflow_drained: AtomicU64,
    /// Overflow entries that notified a real device queue.
    pub overflow_notified: AtomicU64,
    /// Trapping kicks (the kick eventfds' counts).
    pub fallback_kicks: AtomicU64,
    /// Guest writes to read-only pages of the para region.
    pub protected_writes: AtomicU64,
    /// Events whose queue work the monitor ran itself (run to completion).
    pub inline_runs: AtomicU64,
    /// Events other host threads posted through a host-written range
    /// (`host_lane`; not in `events`, which are the guest's), and the
    /// wake-ups of a parked monitor they made.
    pub host_events: AtomicU64,
    pub host_kicks: AtomicU64,
    pub rejected: Tally<Rejected>,
}

impl Counters {
    #[must_use]
    pub fn rejected(&self, r: Rejected) -> u64 {
        self.rejected.count(r)
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A device a guest's events may name: its PCI device number on bus 0 and, per
/// virtqueue, the eventfd that wakes its worker exactly like a notify write does.
pub struct Target {
    pub device: u8,
    pub queues: Vec<EventFd>,
    /// Runs queue `q`'s work on the calling (monitor) thread: run to
    /// completion, no wake-up of the device's worker. False when the device
    /// cannot take it now (not activated): the eventfd wakes the worker then.
    pub inline: Option<InlineWork>,
}

/// A device whose events the monitor handles itself, on its own thread (no
/// eventfd, no other thread woken): `call(queue)` acts on one event and says
/// whether the queue named something real.
pub struct CallTarget {
    pub device: u8,
    /// Queues `0..queues` it may name (all run when the ring's overflow set
    /// says only "this device has work").
    pub queues: u16,
    pub call: Arc<dyn Fn(u16) -> bool + Send + Sync>,
}

/// See [`Target::inline`].
pub type InlineWork = Arc<dyn Fn(u16) -> bool + Send + Sync>;

/// One guest's side of the doorbells: what its events do, and its counters.
pub struct GuestDoorbells {
    pub name: String,
    pub counters: Counters,
    targets: Vec<Target>,
    calls: Vec<CallTarget>,
    /// The notification benchmark's observer (`--notify-bench` only).
    pub bench: OnceLock<Arc<bench::NotifyBench>>,
    /// Run-time re-designation (`--doorbell-redesignate` only).
    pub redesignation: OnceLock<redesignate::Redesignation>,
}

impl GuestDoorbells {
    #[must_use]
    pub fn new(name: &str, targets: Vec<Target>) -> Self {
        Self {
            name: name.to_owned(),
            counters: Counters::default(),
            targets,
            calls: Vec::new(),
            bench: OnceLock::new(),
            redesignation: OnceLock::new(),
        }
    }

    fn reject(&self, r: Rejected, what: std::fmt::Arguments<'_>) {
        self.counters
            .rejected
            .reject(r, &self.name, "doorbell input", what);
    }

    /// Adds devices whose events run on the monitor's thread.
    #[must_use]
    pub fn with_calls(mut self, calls: Vec<CallTarget>) -> Self {
        self.calls = calls;
        self
    }

    /// Rings the queue; false (and counted) when the guest named nothing real.
    fn notify(&self, device: u8, queue: u16, op: Op) -> bool {
        if let Some(c) = self.calls.iter().find(|c| c.device == device) {
            if op != Op::Notify || !(c.call)(queue) {
                self.reject(
                    Rejected::UnknownQueue,
                    format_args!("{op:?} to device {device} queue {queue}"),
                );
                return false;
            }
            return true;
        }
        let Some(t) = self.targets.iter().find(|t| t.device == device) else {
            self.reject(Rejected::UnknownDevice, format_args!("device {device}"));
            return false;
        };
        let Some(q) = t.queues.get(usize::from(queue)) else {
            self.reject(
                Rejected::UnknownQueue,
                format_args!("device {device} queue {queue}"),
            );
            return false;
        };
        if op == Op::Custom {
            self.reject(
                Rejected::UnsupportedOp,
                format_args!("{op:?} to device {device}"),
            );
            return false;
        }
        if t.inline.as_ref().is_some_and(|run| run(queue)) {
            bump(&self.counters.inline_runs);
            return true;
        }
        // The same wake-up the ioeventfd of the queue's notify address gives.
        let _ = q.write(1);
        true
    }

    /// Runs one event taken from the ring.
    pub fn event(&self, e: Event) {
        if e.device == SINK {
            bump(&self.counters.sink_events);
        } else if let (BENCH, Some(b)) = (e.device, self.bench.get()) {
            b.observe();
        } else if self.notify(e.device, e.queue, e.op) {
            bump(&self.counters.events);
        }
    }

    /// Runs one event another host thread posted (`host_lane`): counted as a
    /// host event, not as one of the guest's notifications.
    pub fn host_event(&self, e: Event) {
        if self.notify(e.device, e.queue, e.op) {
            bump(&self.counters.host_events);
        }
    }

    /// Counts a slot the consumer refused.
    pub fn rejected(&self, r: RejectReason) {
        self.reject(Rejected::from_ring(r), format_args!("{r:?}"));
    }

    /// Runs one entry of the overflow set (level-triggered: "has work").
    pub fn pending(&self, p: Pending) {
        bump(&self.counters.overflow_drained);
        match p {
            Pending::Event(e) if e.device == SINK => {}
            Pending::Event(e) => {
                if self.notify(e.device, e.queue, e.op) {
                    bump(&self.counters.overflow_notified);
                }
            }
            Pending::Device(SINK) => {}
            Pending::Device(d) if self.calls.iter().any(|c| c.device == d) => {
                for c in self.calls.iter().filter(|c| c.device == d) {
                    for q in 0..c.queues {
                        (c.call)(q);
                    }
                }
                bump(&self.counters.overflow_notified);
            }
            Pending::Device(d) => match self.targets.iter().find(|t| t.device == d) {
                Some(t) => {
                    for q in &t.queues {
                        let _ = q.write(1);
                    }
                    bump(&self.counters.overflow_notified);
                }
                None => self.reject(Rejected::UnknownDevice, format_args!("overflow device {d}")),
            },
        }
    }

    /// A snapshot of the counters for the report and the marks.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        Snapshot {
            events: get(&c.events),
            sink_events: get(&c.sink_events),
            fallback_kicks: get(&c.fallback_kicks),
            overflow_drained: get(&c.overflow_drained),
            overflow_notified: get(&c.overflow_notified),
            protected_writes: get(&c.protected_writes),
            inline_runs: get(&c.inline_runs),
            host_events: get(&c.host_events),
            host_kicks: get(&c.host_kicks),
            rejected: c.rejected.snapshot(),
        }
    }
}

/// The counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub events: u64,
    pub sink_events: u64,
    pub fallback_kicks: u64,
    pub overflow_drained: u64,
    pub overflow_notified: u64,
    pub protected_writes: u64,
    pub inline_runs: u64,
    pub host_events: u64,
    pub host_kicks: u64,
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
}

/// Guest writes that exit into the para region or the kick window: writes to the
/// read-only pages are refused and counted; a kick of the wrong size (the
/// ioeventfd matches 4-byte writes only) still wakes the monitor.
pub struct ParaMmio {
    pub region: Arc<ParaRegion>,
    pub guest: Arc<GuestDoorbells>,
}

impl MmioDevice for ParaMmio {
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        // Region reads never exit (the slots are readable); kick addresses read 0.
        if (KICK_BASE..KICK_BASE + KICK_SPAN).contains(&addr) {
            data.fill(0);
            return true;
        }
        false
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if self.region.contains(addr) {
            bump(&self.guest.counters.protected_writes);
            crate::guest_log!(warn, guest = %self.guest.name, "write of {} bytes to read-only para region page {addr:#x} refused", data.len());
            return true;
        }
        if (KICK_BASE..KICK_BASE + KICK_SPAN).contains(&addr) {
            if let (para_abi::doorbell::bench::EXIT_GPA, Some(b)) = (addr, self.guest.bench.get()) {
                b.observe();
                return true;
            }
            match self.region.kick_at(addr) {
                Some(e) => {
                    let _ = e.write(1);
                }
                None => self
                    .guest
                    .reject(Rejected::BadKick, format_args!("write at {addr:#x}")),
            }
            return true;
        }
        false
    }
}

/// M1 as a guest's mechanism: its doorbell side, and the para region when the
/// guest is offered one (`--doorbells on`).
pub struct Doorbells {
    pub guest: Arc<GuestDoorbells>,
    pub para: Option<Arc<ParaRegion>>,
    /// How a re-designation is announced (M3), when the guest takes upcalls.
    upcaller: Option<Upcaller>,
}

/// The calls of the test facilities (the benchmark's set-up, re-designation).
const CALLS: &[Call] = &[Call::NotifyBench, Call::DoorbellRedesignate];

impl Doorbells {
    #[must_use]
    pub fn new(
        guest: Arc<GuestDoorbells>,
        para: Option<Arc<ParaRegion>>,
        upcaller: Option<Upcaller>,
    ) -> Self {
        Self {
            guest,
            para,
            upcaller,
        }
    }
}

impl Mechanism for Doorbells {
    fn name(&self) -> &'static str {
        "doorbells"
    }

    /// The para region's place, with the features it brings.
    fn offer(&self) -> Option<Offer> {
        let region = self.para.as_ref()?;
        let (eax, ebx, ecx, edx) =
            discovery::para_region_registers(region.plan.base, region.plan.size as u32);
        Some(Offer {
            feature: features::PARA_REGION | features::DOORBELLS,
            leaf: discovery::LEAF_PARA_REGION,
            regs: [eax, ebx, ecx, edx],
        })
    }

    fn mmio(self: Arc<Self>) -> Option<Arc<dyn MmioDevice>> {
        let region = self.para.clone()?;
        Some(Arc::new(ParaMmio {
            region,
            guest: self.guest.clone(),
        }))
    }

    fn calls(&self) -> &'static [Call] {
        CALLS
    }

    fn hypercall(&self, cx: &CallCtx<'_>, call: Call, arg: u64) -> u64 {
        let status = match call {
            Call::NotifyBench => {
                let status = self
                    .guest
                    .bench
                    .get()
                    .map_or(Status::UnknownCall, |b| b.setup(cx.fd, arg));
                if status != Status::Ok {
                    cx.platform.reject(
                        Reject::UnknownHypercall,
                        format_args!("notify bench set-up at {arg:#x} -> {status:?}"),
                    );
                }
                status
            }
            Call::DoorbellRedesignate => {
                let status = self
                    .guest
                    .redesignation
                    .get()
                    .map_or(Status::UnknownCall, |r| {
                        r.swap(&self.guest.name, || {
                            self.upcaller
                                .as_ref()
                                .is_some_and(|u| u(None, UpcallClass::Redesignation).is_some())
                        })
                    });
                if status == Status::UnknownCall {
                    cx.platform.reject(
                        Reject::UnknownHypercall,
                        format_args!("doorbell re-designation without --doorbell-redesignate"),
                    );
                }
                status
            }
            _ => Status::UnknownCall,
        };
        status as u64
    }

    /// The guest ends and its monitors will stop: writing is withdrawn, so
    /// a vCPU still running sends through the notify register (what it wrote
    /// before is consumed by the monitors' last pass).
    fn ending(&self) {
        if let Some(region) = &self.para {
            region.control().set_writing_allowed(false);
        }
    }

    fn mark(&self, m: &mut MarkReport) {
        let s = self.guest.snapshot();
        m.doorbell_events = s.events;
        m.sink_events = s.sink_events;
    }

    fn report(&self, r: &mut GuestReport) {
        let s = self.guest.snapshot();
        r.doorbell = DoorbellReport {
            offered: self.para.is_some(),
            events: s.events,
            sink_events: s.sink_events,
            fallback_kicks: s.fallback_kicks,
            overflow_drained: s.overflow_drained,
            overflow_notified: s.overflow_notified,
            rejected: s.rejected,
            protected_writes: s.protected_writes,
            host_events: s.host_events,
            host_kicks: s.host_kicks,
            notify_bench: self.guest.bench.get().map(|b| b.report()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic() -> (GuestDoorbells, Vec<EventFd>) {
        let fds: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let clones = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        (
            GuestDoorbells::new(
                "t",
                vec![Target {
                    device: 1,
                    queues: clones,
                    inline: None,
                }],
            ),
            fds,
        )
    }

    #[test]
    fn events_ring_the_right_queue() {
        let (g, fds) = nic();
        g.event(Event::new(1, 1, Op::TxKick));
        g.event(Event::new(1, 1, Op::Notify));
        g.event(Event::new(1, 0, Op::RxRefill));
        assert_eq!(fds[1].read().unwrap(), 2);
        assert_eq!(fds[0].read().unwrap(), 1);
        let s = g.snapshot();
        assert_eq!((s.events, s.sink_events), (3, 0));
        assert!(s.rejected.is_empty());
    }

    #[test]
    fn sink_counts_and_unknowns_are_rejected() {
        let (g, fds) = nic();
        for _ in 0..5 {
            g.event(Event::new(SINK, 7, Op::Custom));
        }
        g.event(Event::new(2, 0, Op::Notify));
        g.event(Event::new(1, 2, Op::Notify));
        g.event(Event::new(1, 0xFFFF, Op::Notify));
        g.event(Event::new(1, 0, Op::Custom));
        g.rejected(RejectReason::BadCheck);
        g.rejected(RejectReason::WrongSequence {
            expected: 1,
            found: 2,
        });
        let s = g.snapshot();
        assert_eq!((s.events, s.sink_events), (0, 5));
        assert_eq!(s.rejected["unknown_device"], 1);
        assert_eq!(s.rejected["unknown_queue"], 2);
        assert_eq!(s.rejected["unsupported_op"], 1);
        assert_eq!(s.rejected["bad_check"], 1);
        assert_eq!(s.rejected["wrong_sequence"], 1);
        assert!(fds.iter().all(|f| f.read().is_err()), "nothing was rung");
    }

    #[test]
    fn exiting_writes_are_refused_or_kick() {
        let region = crate::mech::doorbell::manager::test_region();
        let (g, _) = nic();
        let m = ParaMmio {
            region: region.clone(),
            guest: Arc::new(g),
        };
        let base = region.plan.base;
        // Header page and the protected status page: refused, counted, unchanged.
        assert!(m.mmio_write(base, &[0; 8]));
        assert!(m.mmio_write(region.plan.designations[0].range_gpa, &[0xFF; 8]));
        assert!(region.control().check().is_ok());
        // A 1-byte kick (the ioeventfd only matches 4 bytes) still wakes the monitor.
        assert!(m.mmio_write(KICK_BASE, &[1]));
        assert_eq!(region.kicks[0].read().unwrap(), 1);
        assert!(m.mmio_write(KICK_BASE + 0x100, &[1, 0, 0, 0]));
        let mut d = [0xAA; 4];
        assert!(m.mmio_read(KICK_BASE, &mut d));
        assert_eq!(d, [0; 4]);
        assert!(!m.mmio_write(0xFEB0_0000, &[0]), "outside: not ours");
        let s = m.guest.snapshot();
        assert_eq!(s.protected_writes, 2);
        assert_eq!(s.rejected["bad_kick"], 1);
    }

    #[test]
    fn overflow_entries_notify_levels() {
        let (g, fds) = nic();
        g.pending(Pending::Event(Event::new(1, 0, Op::RxRefill)));
        g.pending(Pending::Device(1));
        g.pending(Pending::Device(SINK));
        g.pending(Pending::Device(9));
        assert_eq!(fds[0].read().unwrap(), 2);
        assert_eq!(fds[1].read().unwrap(), 1);
        let s = g.snapshot();
        assert_eq!((s.overflow_drained, s.overflow_notified), (4, 2));
        assert_eq!(s.rejected["unknown_device"], 1);
        assert_eq!((s.events, s.sink_events), (0, 0));
    }
}
