//! The VM queue manager: moves messages from a sender's outbox into the
//! destination's inbox and receive window, by copy or by page exchange.
//!
//! Everything in the rings is guest-written and hostile: the manager keeps its
//! own copies of the counters it produces (inbox `produced`, outbox `consumed`),
//! checks every descriptor ([`Message::check`], then ownership of every page it
//! names) and answers each with a [`SendStatus`] in the outbox entry.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use para_abi::layout::area;
use para_abi::vmq::{
    self, Arrival, DirRecord, ENTRY_SIZE, Header, Message, Policy, RING_CONSUMED, RING_ENTRIES,
    RING_PRODUCED, SendStatus, Transfer,
};

use super::pages::{Backings, Limits, Mapping};
use crate::loglimit::LogLimit;
use crate::sync::lock;

const PAGE: u64 = vmq::PAGE;
const WINDOW_PAGES: usize = (vmq::WINDOW_SIZE / PAGE) as usize;

/// Per-guest VM-queue counters (sender and receiver side), in the stats JSON
/// under `vmq`.
#[derive(Debug, Default)]
pub struct VmqCounters {
    /// Messages delivered, by the policy they asked for.
    pub sent_immediate: AtomicU64,
    pub sent_lazy: AtomicU64,
    pub sent_doorbell: AtomicU64,
    pub delivered_copy: AtomicU64,
    pub delivered_remap: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub received: AtomicU64,
    pub bytes_received: AtomicU64,
    /// `mmap(MAP_FIXED)` calls made for this guest's remapped sends.
    pub remap_mmaps: AtomicU64,
    /// Drains that found at least one message (flush hypercalls are counted
    /// with the shim's exits by reason, `hypercall`).
    pub drains: AtomicU64,
    /// Drains stopped at a full destination by a [`Message::HOLD`] message.
    pub held: AtomicU64,
    /// Arrival interrupts sent to this guest (inbox empty → non-empty).
    pub notifications: AtomicU64,
    /// Of those, left unsent because the guest asked for none
    /// (`vmq::INBOX_QUIET`) and was running: it sees them at its next wait.
    pub notifications_quiet: AtomicU64,
    pub err_outside_ram: AtomicU64,
    pub err_not_owned: AtomicU64,
    pub err_no_such_vm: AtomicU64,
    pub err_queue_full: AtomicU64,
    pub err_vm_exited: AtomicU64,
    pub err_bad_descriptor: AtomicU64,
    /// Remaps refused because they would split the shim's mappings beyond this
    /// sender's share of `vm.max_map_count` (nothing was mapped).
    pub err_remap_limit: AtomicU64,
    /// Remaps whose `mmap` or hole punch failed; undone, so refused.
    pub err_remap_failed: AtomicU64,
    /// Ring counters that made no sense (consumer ahead of producer...).
    pub bad_ring: AtomicU64,
    /// Host mapping fragments this guest's remaps hold now, and its bound.
    pub remap_fragments: AtomicU64,
    pub remap_fragment_limit: AtomicU64,
    /// Receive-window pages handed out for the first time (each costs the
    /// guest a page fault on its first touch under shadow paging).
    pub window_fresh_pages: AtomicU64,
    /// Why the shim drained this guest's outbox: `VmqFlush` hypercalls,
    /// kick-page flushes (the guest's outbox was full / otherwise), kick-page
    /// waits (the guest was about to idle), and messages delivered at each
    /// kind of drain (`at_exit`: any other exit of the sender, the lazy
    /// policy's natural delivery point; `at_worker`: the doorbell worker).
    pub flush_calls: AtomicU64,
    pub kick_flushes: AtomicU64,
    pub full_flushes: AtomicU64,
    pub waits: AtomicU64,
    /// Immediate flushes that waited in the same exit (`UntilDone::IfHeld`;
    /// not in `waits`): one exit delivered and waited for the next arrival.
    pub flush_waits: AtomicU64,
    /// Waits that ended with something in the inbox (else: outbox progress,
    /// the deadline, or the guest ending).
    pub waits_woken: AtomicU64,
    pub delivered_at_flush: AtomicU64,
    pub delivered_at_wait: AtomicU64,
    pub delivered_at_exit: AtomicU64,
    pub delivered_at_worker: AtomicU64,
    pub delivered_at_monitor: AtomicU64,
    /// Kick-page accesses that were not an 8-byte store (refused).
    pub bad_kicks: AtomicU64,
}

/// [`VmqCounters`] as serialised.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct VmqReport {
    pub id: u32,
    pub sent_immediate: u64,
    pub sent_lazy: u64,
    pub sent_doorbell: u64,
    pub delivered_copy: u64,
    pub delivered_remap: u64,
    pub bytes_sent: u64,
    pub received: u64,
    pub bytes_received: u64,
    pub remap_mmaps: u64,
    pub drains: u64,
    pub held: u64,
    pub notifications: u64,
    pub notifications_quiet: u64,
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub bad_ring: u64,
    pub remap_fragments: u64,
    pub remap_fragment_limit: u64,
    pub window_fresh_pages: u64,
    pub flush_calls: u64,
    pub kick_flushes: u64,
    pub full_flushes: u64,
    pub waits: u64,
    pub flush_waits: u64,
    pub waits_woken: u64,
    pub delivered_at_flush: u64,
    pub delivered_at_wait: u64,
    pub delivered_at_exit: u64,
    pub delivered_at_worker: u64,
    pub delivered_at_monitor: u64,
    pub bad_kicks: u64,
}

/// Why a message was refused: its status, or a remap refused for a reason of
/// its own (the sender sees `QueueFull` for those: it may resend, or copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Status(SendStatus),
    RemapLimit,
    RemapFailed,
}

impl From<SendStatus> for Refusal {
    fn from(s: SendStatus) -> Self {
        Self::Status(s)
    }
}

impl Refusal {
    fn status(self) -> SendStatus {
        match self {
            Self::Status(s) => s,
            Self::RemapLimit | Self::RemapFailed => SendStatus::QueueFull,
        }
    }
}

impl VmqCounters {
    fn refusal(&self, r: Refusal) -> &AtomicU64 {
        match r {
            Refusal::Status(s) => self.error(s),
            Refusal::RemapLimit => &self.err_remap_limit,
            Refusal::RemapFailed => &self.err_remap_failed,
        }
    }

    fn error(&self, s: SendStatus) -> &AtomicU64 {
        match s {
            SendStatus::OutsideRam => &self.err_outside_ram,
            SendStatus::NotOwned => &self.err_not_owned,
            SendStatus::NoSuchVm => &self.err_no_such_vm,
            SendStatus::QueueFull => &self.err_queue_full,
            SendStatus::VmExited => &self.err_vm_exited,
            SendStatus::BadDescriptor | SendStatus::Pending | SendStatus::Delivered => {
                &self.err_bad_descriptor
            }
        }
    }

    #[must_use]
    pub fn report(&self, id: u32) -> VmqReport {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VmqReport {
            id,
            sent_immediate: g(&self.sent_immediate),
            sent_lazy: g(&self.sent_lazy),
            sent_doorbell: g(&self.sent_doorbell),
            delivered_copy: g(&self.delivered_copy),
            delivered_remap: g(&self.delivered_remap),
            bytes_sent: g(&self.bytes_sent),
            received: g(&self.received),
            bytes_received: g(&self.bytes_received),
            remap_mmaps: g(&self.remap_mmaps),
            drains: g(&self.drains),
            held: g(&self.held),
            notifications: g(&self.notifications),
            notifications_quiet: g(&self.notifications_quiet),
            errors: [
                ("outside_ram", g(&self.err_outside_ram)),
                ("not_owned", g(&self.err_not_owned)),
                ("no_such_vm", g(&self.err_no_such_vm)),
                ("queue_full", g(&self.err_queue_full)),
                ("vm_exited", g(&self.err_vm_exited)),
                ("bad_descriptor", g(&self.err_bad_descriptor)),
                ("remap_limit", g(&self.err_remap_limit)),
                ("remap_failed", g(&self.err_remap_failed)),
            ]
            .into_iter()
            .collect(),
            bad_ring: g(&self.bad_ring),
            remap_fragments: g(&self.remap_fragments),
            remap_fragment_limit: g(&self.remap_fragment_limit),
            window_fresh_pages: g(&self.window_fresh_pages),
            flush_calls: g(&self.flush_calls),
            kick_flushes: g(&self.kick_flushes),
            full_flushes: g(&self.full_flushes),
            waits: g(&self.waits),
            flush_waits: g(&self.flush_waits),
            waits_woken: g(&self.waits_woken),
            delivered_at_flush: g(&self.delivered_at_flush),
            delivered_at_wait: g(&self.delivered_at_wait),
            delivered_at_exit: g(&self.delivered_at_exit),
            delivered_at_worker: g(&self.delivered_at_worker),
            delivered_at_monitor: g(&self.delivered_at_monitor),
            bad_kicks: g(&self.bad_kicks),
        }
    }
}

/// One guest's memory as the manager reaches it: host addresses of its RAM
/// (guest-physical 0..`ram_len`) and of its VM-queue area (at [`area::VMQ`]).
/// `keep` owns the mappings so they outlive the manager's use of them.
pub struct EndpointMemory {
    pub ram: Mapping,
    pub area: Mapping,
    pub ram_file: Arc<std::fs::File>,
    pub area_file: Arc<std::fs::File>,
    pub keep: Box<dyn std::any::Any + Send + Sync>,
}

/// What the manager calls to tell a guest that its inbox went empty → non-empty.
pub type Notify = Box<dyn Fn() + Send + Sync>;

/// An arrival still in the destination's inbox, holding window pages.
struct Live {
    index: u32,
    first: usize,
    pages: usize,
}

struct Endpoint {
    name: String,
    ram_base: usize,
    ram_len: u64,
    area_base: usize,
    _keep: Box<dyn std::any::Any + Send + Sync>,
    alive: bool,
    /// It has a direct channel to every other guest with one (`mech::direct`).
    direct: bool,
    window_used: Vec<bool>,
    /// Window pages ever handed out: a page used before is already mapped
    /// in the guest's (shadow) page tables, a fresh one costs a fault.
    window_seen: Vec<bool>,
    /// No window page below this index is free (a search starts here).
    low: usize,
    live: VecDeque<Live>,
    inbox_produced: u32,
    outbox_consumed: u32,
    /// Its vCPU is blocked in [`Manager::wait`]: arrivals wake it through
    /// the manager's condition variable, not its `notify`.
    waiting: bool,
    notify: Notify,
    counters: Arc<VmqCounters>,
}

impl Endpoint {
    fn u32_at(&self, off: u64) -> &AtomicU32 {
        // SAFETY: `off` is a 4-aligned offset of a ring's counter lines (or
        // `INBOX_QUIET` among them) inside the area, which `_keep` keeps mapped for `self`'s lifetime; an
        // AtomicU32 has the size and alignment of u32 and the guest only ever
        // writes it with aligned stores.
        unsafe { &*((self.area_base + off as usize) as *const AtomicU32) }
    }

    fn read_entry(&self, off: u64) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        for (i, v) in b.iter_mut().enumerate() {
            // SAFETY: `off..off+ENTRY_SIZE` is inside the mapped area (ring
            // entries); volatile because the guest may write it concurrently.
            *v = unsafe {
                std::ptr::read_volatile((self.area_base + off as usize + i) as *const u8)
            };
        }
        b
    }

    fn write_bytes(&self, off: u64, bytes: &[u8]) {
        for (i, &v) in bytes.iter().enumerate() {
            // SAFETY: as in `read_entry`: inside the mapped area.
            unsafe {
                std::ptr::write_volatile((self.area_base + off as usize + i) as *mut u8, v);
            }
        }
    }

    /// Gives back the window pages of arrivals the guest has consumed.
    /// Returns the inbox occupancy, or `None` when the guest's counter is bogus.
    fn reap(&mut self) -> Option<u32> {
        let consumed = self
            .u32_at(vmq::INBOX + RING_CONSUMED)
            .load(Ordering::Acquire);
        let Some(n) = vmq::occupancy(self.inbox_produced, consumed) else {
            self.counters.bad_ring.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        while let Some(l) = self.live.front() {
            // `l.index` is before `consumed` in wrapping order.
            if consumed.wrapping_sub(l.index).cast_signed() <= 0 {
                break;
            }
            let (first, pages) = (l.first, l.pages);
            self.live.pop_front();
            self.free(first, pages);
        }
        Some(n)
    }

    /// Lowest-first fit: `pages` free window pages starting at a multiple of
    /// `align` pages, the lowest such run. Reusing the pages the guest just
    /// handed back, rather than rotating through the whole window, keeps the
    /// pages an arrival lands in already mapped in the guest's page tables:
    /// on this host (shadow paging) the first guest touch of every fresh 4 KiB
    /// page is a fault, so a rotating cursor made a 64 MiB stream fault on
    /// every window page once more per pass.
    fn alloc(&mut self, pages: usize, align: usize) -> Option<usize> {
        let slots = WINDOW_PAGES / align;
        for slot in self.low / align..slots {
            let first = slot * align;
            if first + pages <= WINDOW_PAGES
                && self.window_used[first..first + pages].iter().all(|u| !u)
            {
                for u in &mut self.window_used[first..first + pages] {
                    *u = true;
                }
                let fresh = self.window_seen[first..first + pages]
                    .iter_mut()
                    .map(|s| !std::mem::replace(s, true))
                    .filter(|&f| f)
                    .count();
                self.counters
                    .window_fresh_pages
                    .fetch_add(fresh as u64, Ordering::Relaxed);
                if first == self.low {
                    self.low = first + pages;
                }
                return Some(first);
            }
        }
        None
    }

    /// Gives window pages `first..first + pages` back.
    fn free(&mut self, first: usize, pages: usize) {
        for u in &mut self.window_used[first..first + pages] {
            *u = false;
        }
        self.low = self.low.min(first);
    }

    fn write_directory(&self, dir: &[DirRecord], my_id: u32) {
        let h = Header {
            magic: vmq::MAGIC,
            version: vmq::VERSION,
            my_id,
            dir_len: dir.len() as u32,
            window: area::VMQ + vmq::WINDOW,
            window_size: vmq::WINDOW_SIZE,
        };
        self.write_bytes(vmq::HEADER, &h.encode());
        for (i, r) in dir.iter().enumerate() {
            self.write_bytes(
                vmq::DIRECTORY + (i * vmq::DIR_RECORD_SIZE) as u64,
                &r.encode(),
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmqError {
    #[error("at most {} guests can use VM queues", vmq::DIR_ENTRIES)]
    TooMany,
    #[error("a VM-queue mapping is not page aligned")]
    Unaligned,
}

/// What one drain did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    pub delivered: u32,
    pub failed: u32,
}

struct Inner {
    eps: Vec<Endpoint>,
    backings: Backings,
}

/// Why an outbox is drained (counted per guest, see [`VmqCounters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// An exit the guest made for another reason (the lazy policy's point).
    Exit,
    /// A flush the guest asked for (hypercall or kick page).
    Flush,
    /// The guest is about to idle (kick page wait).
    Wait,
    /// The doorbell worker thread.
    Worker,
    /// The M1 monitor that consumed the doorbell event, itself (run to completion).
    Monitor,
}

/// The longest a guest blocks in [`Manager::wait`] when it names no limit.
pub const WAIT_MAX: Duration = Duration::from_millis(10);
/// How often a blocked guest retries its held messages (a destination that
/// consumes makes no exit the shim sees, so nothing else tells it).
pub const WAIT_RETRY: Duration = Duration::from_micros(200);

/// Log lines guests can trigger, each through its own rate limit.
#[derive(Default)]
struct Logs {
    refused: LogLimit,
    bad_outbox: LogLimit,
}

/// The VM queue manager shared by every guest's vCPU threads.
pub struct Manager {
    inner: Mutex<Inner>,
    /// Guests blocked in [`Manager::wait`] (their vCPU threads) wait here.
    /// Notified only after `inner` is let go: a woken thread on the
    /// notifier's host CPU runs at once and would block on the lock still
    /// held, costing two more context switches.
    cv: Condvar,
    logs: Logs,
}

impl Default for Manager {
    fn default() -> Self {
        Self::new()
    }
}

impl Manager {
    #[must_use]
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                eps: Vec::new(),
                backings: Backings::default(),
            }),
            cv: Condvar::new(),
            logs: Logs::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Adds a guest; its id is its position. Rewrites every guest's directory.
    pub fn add(
        &self,
        name: &str,
        mem: EndpointMemory,
        notify: Notify,
    ) -> Result<(u32, Arc<VmqCounters>), VmqError> {
        let mut inner = self.lock();
        if inner.eps.len() >= vmq::DIR_ENTRIES {
            return Err(VmqError::TooMany);
        }
        if !(mem.ram.base as u64).is_multiple_of(PAGE)
            || !(mem.area.base as u64).is_multiple_of(PAGE)
        {
            return Err(VmqError::Unaligned);
        }
        let rf = inner.backings.add_file(mem.ram_file);
        let af = inner.backings.add_file(mem.area_file);
        inner.backings.add_mapping(Mapping {
            file: rf,
            ..mem.ram
        });
        inner.backings.add_mapping(Mapping {
            file: af,
            ..mem.area
        });
        let counters = Arc::new(VmqCounters::default());
        let id = inner.eps.len() as u32;
        // Every sender's share of the mapping budget shrinks as guests join
        // (they all join before any runs).
        let limits = Limits::new(inner.backings.limits.max_map_count, inner.eps.len() + 1);
        inner.backings.limits = limits;
        for c in inner.eps.iter().map(|e| &e.counters).chain([&counters]) {
            c.remap_fragment_limit
                .store(limits.per_sender as u64, Ordering::Relaxed);
        }
        inner.eps.push(Endpoint {
            name: name.to_owned(),
            ram_base: mem.ram.base,
            ram_len: mem.ram.len,
            area_base: mem.area.base,
            _keep: mem.keep,
            alive: true,
            direct: false,
            window_used: vec![false; WINDOW_PAGES],
            window_seen: vec![false; WINDOW_PAGES],
            low: 0,
            live: VecDeque::new(),
            inbox_produced: 0,
            outbox_consumed: 0,
            waiting: false,
            notify,
            counters: counters.clone(),
        });
        publish_directory(&inner.eps);
        Ok((id, counters))
    }

    /// Guest `id` has direct channels to the other guests that have them; the
    /// directory says so to each of them.
    pub fn set_direct(&self, id: u32) {
        let mut inner = self.lock();
        if let Some(e) = inner.eps.get_mut(id as usize) {
            e.direct = true;
            publish_directory(&inner.eps);
        }
    }

    /// The destination can no longer receive; senders get `VmExited`.
    pub fn mark_exited(&self, id: u32) {
        let mut inner = self.lock();
        if let Some(e) = inner.eps.get_mut(id as usize)
            && e.alive
        {
            e.alive = false;
            publish_directory(&inner.eps);
        }
    }

    /// The outbox's guest-written `produced` differs from what the manager last
    /// consumed: there is something to deliver. Cheap enough for every exit.
    #[must_use]
    pub fn outbox_pending(area_base: usize) -> bool {
        // SAFETY: the caller passes the base of a VM-queue area it keeps mapped;
        // the counters are aligned u32s in its first page.
        let (p, c) = unsafe {
            (
                &*((area_base + (vmq::OUTBOX + RING_PRODUCED) as usize) as *const AtomicU32),
                &*((area_base + (vmq::OUTBOX + RING_CONSUMED) as usize) as *const AtomicU32),
            )
        };
        p.load(Ordering::Relaxed) != c.load(Ordering::Relaxed)
    }

    /// Delivers everything in guest `id`'s outbox, at one of its exits.
    pub fn drain(&self, id: u32) -> Drained {
        self.drain_by(id, Origin::Exit)
    }

    /// Delivers everything in guest `id`'s outbox, counted under `origin`.
    pub fn drain_by(&self, id: u32, origin: Origin) -> Drained {
        let mut inner = self.lock();
        let d = self.drain_locked(&mut inner, id);
        if let Some(e) = inner.eps.get(id as usize) {
            let c = &e.counters;
            match origin {
                Origin::Exit => &c.delivered_at_exit,
                Origin::Flush => &c.delivered_at_flush,
                Origin::Wait => &c.delivered_at_wait,
                Origin::Worker => &c.delivered_at_worker,
                Origin::Monitor => &c.delivered_at_monitor,
            }
            .fetch_add(u64::from(d.delivered), Ordering::Relaxed);
        }
        drop(inner);
        if d.delivered > 0 {
            // A blocked sender held behind this guest, or a receiver waiting
            // for these messages, may go on now.
            self.cv.notify_all();
        }
        d
    }

    /// Drains guest `id`'s outbox (counted as delivered at a wait), then
    /// blocks the calling thread (the guest's vCPU thread) until more than
    /// `k.seen` arrivals wait in its inbox, or (`k.done`: always, or only
    /// if this first drain held something back) every message it posted
    /// has been acted on, or it is ending, or `k.max_us` (at most
    /// [`WAIT_MAX`]) passes. True when it returned for an arrival.
    pub fn wait(&self, id: u32, k: &vmq::Kick) -> bool {
        let max = match k.max_us {
            0 => WAIT_MAX,
            us => Duration::from_micros(u64::from(us)).min(WAIT_MAX),
        };
        let deadline = Instant::now() + max;
        let mut first = true;
        let mut watch_done = k.done == vmq::UntilDone::Yes;
        // A guest that waits has usually just consumed what it had: senders
        // held back by its full inbox may get through now. Its consuming
        // made no exit, so this is the first moment the shim can know.
        self.cv.notify_all();
        let mut inner = self.lock();
        loop {
            let d = self.drain_locked(&mut inner, id);
            if d.delivered > 0 {
                // Receivers of these messages wake once the lock is free.
                drop(inner);
                self.cv.notify_all();
                inner = self.lock();
            }
            let Some(e) = inner.eps.get_mut(id as usize) else {
                return false;
            };
            e.counters
                .delivered_at_wait
                .fetch_add(u64::from(d.delivered), Ordering::Relaxed);
            let posted = e
                .u32_at(vmq::OUTBOX + RING_PRODUCED)
                .load(Ordering::Acquire);
            if first && k.done == vmq::UntilDone::IfHeld {
                // An immediate flush that waits: counted as the flush it is.
                e.counters.flush_waits.fetch_add(1, Ordering::Relaxed);
                // Its own message held back: it must not sleep behind it.
                watch_done |= posted != e.outbox_consumed;
            } else if first {
                e.counters.waits.fetch_add(1, Ordering::Relaxed);
            }
            let consumed = e.u32_at(vmq::INBOX + RING_CONSUMED).load(Ordering::Acquire);
            // A bogus guest counter reads as "something arrived": it returns.
            let arrived =
                vmq::occupancy(e.inbox_produced, consumed).is_none_or(|n| n > u32::from(k.seen));
            let done = watch_done && posted == e.outbox_consumed;
            if arrived || done || !e.alive || Instant::now() >= deadline {
                e.waiting = false;
                if arrived {
                    e.counters.waits_woken.fetch_add(1, Ordering::Relaxed);
                }
                return arrived;
            }
            first = false;
            e.waiting = true;
            let left = deadline.saturating_duration_since(Instant::now());
            inner = self
                .cv
                .wait_timeout(inner, left.min(WAIT_RETRY))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Whether guest `id`'s vCPU is blocked in [`Self::wait`] (tests).
    #[cfg(test)]
    pub(crate) fn is_waiting(&self, id: u32) -> bool {
        self.lock().eps.get(id as usize).is_some_and(|e| e.waiting)
    }

    /// Wakes every guest blocked in [`Self::wait`] (one of them is ending).
    pub fn wake_all(&self) {
        self.cv.notify_all();
    }

    fn drain_locked(&self, inner: &mut Inner, id: u32) -> Drained {
        let mut out = Drained::default();
        let Some(src) = inner.eps.get(id as usize) else {
            return out;
        };
        let counters = src.counters.clone();
        let produced = src
            .u32_at(vmq::OUTBOX + RING_PRODUCED)
            .load(Ordering::Acquire);
        let mut consumed = src.outbox_consumed;
        if vmq::occupancy(produced, consumed).is_none() {
            counters.bad_ring.fetch_add(1, Ordering::Relaxed);
            crate::guest_log!(warn, limit = self.logs.bad_outbox, guest = %src.name, produced, consumed, "VM-queue outbox counter out of range");
            return out;
        }
        // Destinations found full in this drain: later messages to them are
        // refused too, so that a sender resending from its first refusal keeps
        // its stream in order.
        let mut full: Vec<u32> = Vec::new();
        while consumed != produced {
            let off = vmq::OUTBOX + vmq::entry_offset(consumed);
            let m = Message::decode(&inner.eps[id as usize].read_entry(off));
            let result = if full.contains(&m.dest) {
                Err(Refusal::Status(SendStatus::QueueFull))
            } else {
                deliver(inner, id, &m, &self.logs)
            };
            // A refused remap answers `QueueFull` too, and is held or keeps the
            // stream in order the same way.
            let queue_full = result.is_err_and(|r| r.status() == SendStatus::QueueFull);
            if queue_full && m.flags & Message::HOLD != 0 {
                // Back-pressure: this and everything after it wait for a later
                // exit. A remap refusal is still counted under its reason.
                if let Err(r @ (Refusal::RemapLimit | Refusal::RemapFailed)) = result {
                    counters.refusal(r).fetch_add(1, Ordering::Relaxed);
                }
                counters.held.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if queue_full && !full.contains(&m.dest) {
                full.push(m.dest);
            }
            let status = match result {
                Ok(()) => {
                    out.delivered += 1;
                    SendStatus::Delivered
                }
                Err(r) => {
                    out.failed += 1;
                    counters.refusal(r).fetch_add(1, Ordering::Relaxed);
                    crate::guest_log!(warn, limit = self.logs.refused, guest = %inner.eps[id as usize].name, dest = m.dest, addr = m.addr, len = m.len, "VM-queue send refused: {r:?}");
                    r.status()
                }
            };
            let src = &inner.eps[id as usize];
            src.write_bytes(off + 7, &[status as u8]);
            consumed = consumed.wrapping_add(1);
            src.u32_at(vmq::OUTBOX + RING_CONSUMED)
                .store(consumed, Ordering::Release);
        }
        inner.eps[id as usize].outbox_consumed = consumed;
        if out.delivered + out.failed > 0 {
            counters.drains.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// Every page an exchange places from now on is advised for transparent
    /// huge pages, like the guests' RAM and areas ([`super::pages::advise_huge`]).
    pub fn use_huge_pages(&self) {
        self.lock()
            .backings
            .set_sys(Box::new(super::pages::Kernel { huge: true }));
    }

    /// Pages currently exchanged away from their home (tests, reports).
    #[must_use]
    pub fn moved_pages(&self) -> usize {
        self.lock().backings.moved_pages()
    }

    /// Runs `f` on the remap ledger (tests: fault injection, limits, checks).
    #[cfg(test)]
    pub(crate) fn with_backings<R>(&self, f: impl FnOnce(&mut Backings) -> R) -> R {
        f(&mut self.lock().backings)
    }
}

fn publish_directory(eps: &[Endpoint]) {
    for (reader, r) in eps.iter().enumerate() {
        let dir: Vec<DirRecord> = eps
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut flags = if e.alive { DirRecord::ALIVE } else { 0 };
                // A channel joins two guests that both have them.
                if e.direct && r.direct && i != reader {
                    flags |= DirRecord::DIRECT;
                }
                DirRecord::new(i as u32, &e.name, flags)
            })
            .collect();
        r.write_directory(&dir, reader as u32);
    }
}

/// Where the sender's range lives: host address, and window pages if it names
/// its own receive window.
fn source_range(src: &Endpoint, addr: u64, span: u64) -> Result<usize, SendStatus> {
    let end = addr.checked_add(span).ok_or(SendStatus::OutsideRam)?;
    if end <= src.ram_len {
        return Ok(src.ram_base + addr as usize);
    }
    let w = area::VMQ + vmq::WINDOW;
    if addr >= w && end <= w + vmq::WINDOW_SIZE {
        let first = ((addr - w) / PAGE) as usize;
        let last = ((end - w).div_ceil(PAGE)) as usize;
        // Only pages of arrivals the guest has not yet handed back are its own.
        if src.window_used[first..last].iter().all(|&u| u) {
            return Ok(src.area_base + (addr - area::VMQ) as usize);
        }
        return Err(SendStatus::NotOwned);
    }
    Err(SendStatus::OutsideRam)
}

fn deliver(inner: &mut Inner, from: u32, m: &Message, logs: &Logs) -> Result<(), Refusal> {
    let (policy, transfer) = m.check()?;
    let src = &inner.eps[from as usize];
    let counters = src.counters.clone();

    if m.dest == from {
        return Err(SendStatus::BadDescriptor.into());
    }
    let to = m.dest as usize;
    if to >= inner.eps.len() {
        return Err(SendStatus::NoSuchVm.into());
    }
    if !inner.eps[to].alive {
        return Err(SendStatus::VmExited.into());
    }
    let span = match transfer {
        Transfer::Copy => u64::from(m.len),
        Transfer::Remap => m.footprint(),
    };
    // The sender's own window pages are its only while their arrivals are
    // unconsumed: catch up with its inbox before judging a forward.
    let src = &mut inner.eps[from as usize];
    src.reap();
    let src_host = source_range(src, m.addr, span)?;

    let dst = &mut inner.eps[to];
    let Some(occupied) = dst.reap() else {
        return Err(SendStatus::QueueFull.into());
    };
    if occupied >= RING_ENTRIES {
        return Err(SendStatus::QueueFull.into());
    }
    let pages = (m.footprint() / PAGE) as usize;
    let align = (m.page_size() / PAGE) as usize;
    let first = dst.alloc(pages, align).ok_or(SendStatus::QueueFull)?;
    let dst_off = vmq::WINDOW + first as u64 * PAGE;
    let dst_host = dst.area_base + dst_off as usize;

    match transfer {
        Transfer::Copy => {
            // SAFETY: `src_host..+len` was checked to lie in the sender's RAM or
            // its own live window pages; `dst_host..+footprint` is in the
            // destination's window, just allocated. Different guests' mappings
            // never overlap. The guests may write concurrently: they get what
            // they raced for, the shim only moves bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src_host as *const u8,
                    dst_host as *mut u8,
                    m.len as usize,
                );
            }
            counters.delivered_copy.fetch_add(1, Ordering::Relaxed);
        }
        Transfer::Remap => {
            let pages = Pages {
                src: src_host,
                dst: dst_host,
                first,
                count: pages,
            };
            remap(inner, from, to, &pages, logs)?;
        }
    }
    counters
        .bytes_sent
        .fetch_add(u64::from(m.len), Ordering::Relaxed);
    match policy {
        Policy::Immediate => &counters.sent_immediate,
        Policy::Lazy => &counters.sent_lazy,
        Policy::Doorbell => &counters.sent_doorbell,
    }
    .fetch_add(1, Ordering::Relaxed);

    let dst = &mut inner.eps[to];
    let index = dst.inbox_produced;
    let a = Arrival {
        source: from,
        transfer: transfer as u8,
        len: m.len,
        addr: area::VMQ + dst_off,
        tag: m.tag,
    };
    dst.write_bytes(vmq::INBOX + vmq::entry_offset(index), &a.encode());
    dst.live.push_back(Live {
        index,
        first,
        pages,
    });
    dst.inbox_produced = index.wrapping_add(1);
    dst.u32_at(vmq::INBOX + RING_PRODUCED)
        .store(dst.inbox_produced, Ordering::Release);
    // Store `produced`, then load `consumed`, while the guest stores `consumed`
    // and then loads `produced` before it halts: without a full fence on both
    // sides each may see the other's old value (x86 store buffering, SDM vol 3
    // §9.2.3.4) and the guest sleeps on a non-empty inbox.
    std::sync::atomic::fence(Ordering::SeqCst);
    let now_consumed = dst
        .u32_at(vmq::INBOX + RING_CONSUMED)
        .load(Ordering::Acquire);
    let was_empty = occupied == 0 || now_consumed == index;
    dst.counters.received.fetch_add(1, Ordering::Relaxed);
    dst.counters
        .bytes_received
        .fetch_add(u64::from(m.len), Ordering::Relaxed);
    if was_empty || dst.waiting {
        notify_arrival(dst);
    }
    Ok(())
}

/// Where a remapped message goes: host addresses, and the window pages
/// (`first`, `count`) allocated for it at the destination.
struct Pages {
    src: usize,
    dst: usize,
    first: usize,
    count: usize,
}

/// Exchanges the sender's pages into the destination's window slot; on refusal
/// (the exchange undid itself, the slot shows its old pages) frees the slot.
fn remap(inner: &mut Inner, from: u32, to: usize, p: &Pages, logs: &Logs) -> Result<(), Refusal> {
    let counters = inner.eps[from as usize].counters.clone();
    let done = inner
        .backings
        .exchange(p.src, p.dst, p.count, from as usize);
    let (_, held) = inner.backings.fragments(from as usize);
    counters
        .remap_fragments
        .store(held as u64, Ordering::Relaxed);
    match done {
        Ok(calls) => {
            counters.remap_mmaps.fetch_add(calls, Ordering::Relaxed);
            counters.delivered_remap.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            crate::guest_log!(warn, limit = logs.refused, guest = %inner.eps[from as usize].name, dest = to, "VM-queue remap refused: {e}");
            inner.eps[to].free(p.first, p.count);
            Err(if e.is_limit() {
                Refusal::RemapLimit
            } else {
                Refusal::RemapFailed
            })
        }
    }
}

/// Tells the destination that its inbox went from empty to non-empty. The one
/// seam where M3 upcalls replace the MSI path.
fn notify_arrival(dst: &Endpoint) {
    dst.counters.notifications.fetch_add(1, Ordering::Relaxed);
    if dst.waiting {
        // Its vCPU is blocked in `Manager::wait`: waking that thread is the
        // whole notification (the drainer does it, once the manager's lock
        // is free); an interrupt on top would cost it more exits.
    } else if dst.u32_at(vmq::INBOX_QUIET).load(Ordering::Relaxed) != 0 {
        // It idles only in kick-page waits, which look at the inbox under
        // this lock before blocking: nothing is lost, and an upcall to its
        // running vCPU would cost it an exit.
        dst.counters
            .notifications_quiet
            .fetch_add(1, Ordering::Relaxed);
    } else {
        (dst.notify)();
    }
}
