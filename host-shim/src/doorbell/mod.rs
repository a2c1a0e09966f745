//! M1 on the host: exitless doorbells (DESIGN §3 M1, issue 5 items 2, 3, 6).
//!
//! - [`manager`]: the memory instruction manager — the para region, designations,
//!   read-only/writable memslots, kick addresses.
//! - [`monitor`]: one thread per host CPU consuming the rings designated to it.
//! - here: what an event *means* for one guest ([`GuestDoorbells::event`]), the
//!   per-guest counters, and the MMIO handler for guest writes that exit (the
//!   read-only pages, kicks of the wrong size).

pub mod bench;
pub mod idle_spin;
pub mod manager;
pub mod monitor;
pub mod redesignate;
pub mod waitpkg;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use para_abi::doorbell::device::{BENCH, SINK};
use para_abi::doorbell::ring::{Pending, RejectReason};
use para_abi::doorbell::{Event, Op};
use para_abi::layout::{KICK_BASE, KICK_SPAN};
use tracing::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::platform::MmioDevice;

pub use manager::ParaRegion;

/// Why the host refused a doorbell record or write (the `doorbell.rejected` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Check byte wrong: garbage or a torn (non-atomic) write.
    BadCheck,
    /// Operation field undefined.
    UnknownOp,
    /// A record written for another ring position.
    WrongSequence,
    /// No device with that PCI device number.
    UnknownDevice,
    /// The device has no such queue.
    UnknownQueue,
    /// An operation the device does not take (`Custom` on a NIC).
    UnsupportedOp,
    /// A write in the kick window that is not a kick address.
    BadKick,
}

impl Rejected {
    pub const ALL: [Rejected; 7] = [
        Self::BadCheck,
        Self::UnknownOp,
        Self::WrongSequence,
        Self::UnknownDevice,
        Self::UnknownQueue,
        Self::UnsupportedOp,
        Self::BadKick,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::BadCheck => "bad_check",
            Self::UnknownOp => "unknown_op",
            Self::WrongSequence => "wrong_sequence",
            Self::UnknownDevice => "unknown_device",
            Self::UnknownQueue => "unknown_queue",
            Self::UnsupportedOp => "unsupported_op",
            Self::BadKick => "bad_kick",
        }
    }

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
    rejected: [AtomicU64; Rejected::ALL.len()],
}

impl Counters {
    pub fn reject(&self, r: Rejected) {
        self.rejected[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    #[must_use]
    pub fn rejected(&self, r: Rejected) -> u64 {
        self.rejected[r as usize].load(Ordering::Relaxed)
    }

    /// Non-zero rejection counts by name.
    #[must_use]
    pub fn rejected_map(&self) -> BTreeMap<&'static str, u64> {
        Rejected::ALL
            .iter()
            .map(|&r| (r.name(), self.rejected(r)))
            .filter(|&(_, n)| n > 0)
            .collect()
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
}

/// One guest's side of the doorbells: what its events do, and its counters.
pub struct GuestDoorbells {
    pub name: String,
    pub counters: Counters,
    targets: Vec<Target>,
    logged: AtomicU64,
    /// The notification benchmark's observer (`--notify-bench` only).
    pub bench: std::sync::OnceLock<Arc<bench::NotifyBench>>,
    /// Run-time re-designation (`--doorbell-redesignate` only).
    pub redesignation: std::sync::OnceLock<redesignate::Redesignation>,
}

/// How many rejections per guest are logged (the counts go on).
const LOG_LIMIT: u64 = 8;

impl GuestDoorbells {
    #[must_use]
    pub fn new(name: &str, targets: Vec<Target>) -> Self {
        Self {
            name: name.to_owned(),
            counters: Counters::default(),
            targets,
            logged: AtomicU64::new(0),
            bench: std::sync::OnceLock::new(),
            redesignation: std::sync::OnceLock::new(),
        }
    }

    fn reject(&self, r: Rejected, what: std::fmt::Arguments<'_>) {
        self.counters.reject(r);
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOG_LIMIT {
            warn!(guest = %self.name, reason = r.name(), "rejected doorbell input: {what}");
        }
    }

    /// Rings the queue; false (and counted) when the guest named nothing real.
    fn notify(&self, device: u8, queue: u16, op: Op) -> bool {
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
            rejected: c.rejected_map(),
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
    pub rejected: BTreeMap<&'static str, u64>,
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
            if get(&self.guest.counters.protected_writes) <= LOG_LIMIT {
                warn!(guest = %self.guest.name, "write of {} bytes to read-only para region page {addr:#x} refused", data.len());
            }
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
        let region = crate::doorbell::manager::test_region();
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
