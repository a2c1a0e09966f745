//! M3's delivery, the pending event module: the shim's own events to a guest
//! ("upcalls") are injected as an external interrupt exactly when the vCPU can
//! take one.
//!
//! Per vCPU and per [`UpcallClass`], a pending indicator: the number of upcalls
//! requested and the number published so far. On the vCPU's own thread, before
//! every `KVM_RUN` ([`GuestUpcalls::service`]):
//!
//! * nothing pending: leave the window request to the rest of the shim;
//! * pending and the window open (`ready_for_interrupt_injection` and `if_flag`
//!   of `kvm_run`, api.rst §5 "kvm_run"): publish the counts in the vCPU's
//!   mailbox ([`para_abi::upcall`]) and inject [`VECTOR`] with `KVM_INTERRUPT`;
//! * pending and the window closed: arm `request_interrupt_window`, so KVM
//!   exits with `KVM_EXIT_IRQ_WINDOW_OPEN` as soon as the guest sets IF outside
//!   an interrupt shadow (SDM vol 3 §26.7.5, "interrupt-window exiting"), and
//!   check again then. Any other exit on the way (a hypercall, MMIO...) is
//!   handled by its cause and the check is simply repeated, with the request
//!   still armed.
//!
//! A post from another thread ([`GuestUpcalls::post`]) raises the count and
//! kicks the vCPU (signal + `immediate_exit`), which brings a running or
//! halted vCPU back to that check.
//!
//! Exactly once: the guest consumes by class, by counts (see
//! [`para_abi::upcall`]); the shim only ever raises `posted`, and reads
//! `acked` back (never trusting it) for the report.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_EXIT_IRQ_WINDOW_OPEN, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use para_abi::discovery::{self, features};
use para_abi::layout::area;
use para_abi::upcall::{self, CLASSES, Class as UpcallClass, VECTOR};
use tracing::{debug, warn};

use super::report::{Delivery, LatencyReport, UpcallReport};
use crate::counters::Tally;
use crate::kvm::cpuid::Offer;
use crate::kvm::memory::{SharedMapping, slot};
use crate::reasons;
use crate::sync::lock;
use crate::vcpu::handle::{VcpuShared, inject};

reasons! {
    /// Why the module refused something the guest asked or wrote (`upcalls.rejected`).
    pub Rejected {
        /// A ping or storm count of 0 or beyond the limits of [`para_abi::upcall`].
        BadCount => "bad_count",
        /// A storm interval beyond one second.
        BadInterval => "bad_interval",
        /// A vCPU index past the mailbox area.
        NoMailbox => "no_mailbox",
        /// The guest acknowledged more than was posted.
        AckAhead => "ack_ahead",
        /// A word of the area that is no vCPU's counter (slot padding, the
        /// slot of a vCPU the guest does not have) was found non-zero.
        StrayWrite => "stray_write",
        /// A test-only call (ping, storm) without `--test-hypercalls`.
        TestCallOff => "test_call_off",
        /// A storm while the guest's previous one still runs: one storm
        /// thread per guest at most.
        StormBusy => "storm_busy",
    }
}

/// Latency from the first unpublished post to its injection.
#[derive(Debug, Default)]
struct Latency {
    count: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Latency {
    fn add(&self, ns: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }
    fn report(&self) -> LatencyReport {
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_ns.load(Ordering::Relaxed);
        LatencyReport {
            count,
            mean_ns: sum.checked_div(count).unwrap_or(0),
            max_ns: self.max_ns.load(Ordering::Relaxed),
        }
    }
}

/// One vCPU's pending indicators.
#[derive(Debug, Default)]
pub(super) struct VcpuState {
    /// Upcalls requested per class (only raised, by any thread).
    requested: [AtomicU64; CLASSES],
    /// Upcalls published in the mailbox per class (the vCPU thread only).
    published: [AtomicU64; CLASSES],
    /// Something is requested and not yet published.
    pub(super) pending: AtomicBool,
    /// The window request is armed on behalf of upcalls.
    armed: AtomicBool,
    /// ns since the module's epoch of the oldest unpublished post (0 = none).
    oldest_post_ns: AtomicU64,
    /// When the current stop of this vCPU was first deferred (0 = not deferred).
    stop_deferred_since_ns: AtomicU64,
    /// A stop waits for this vCPU's window: keep the request armed.
    stop_wait: AtomicBool,
    /// The vCPU thread has left its run loop (set under `GuestUpcalls::closed`):
    /// nobody may kick it any more.
    gone: AtomicBool,
    /// The polling path found the window closed since the last injection.
    pub(super) polled: AtomicBool,
    /// The guest said (`UpcallEnable`) that this vCPU's LINT0 takes `ExtINT`:
    /// guest-wide classes may go here ([`GuestUpcalls::post_to_guest`]).
    takes: AtomicBool,
}

/// Counters over all of a guest's vCPUs.
#[derive(Debug, Default)]
struct Counters {
    requested: [AtomicU64; CLASSES],
    injected_immediately: AtomicU64,
    injected_after_window: AtomicU64,
    injected_after_poll: AtomicU64,
    irq_window_exits: AtomicU64,
    poll_reentries: AtomicU64,
    inject_busy: AtomicU64,
    kicks_saved: AtomicU64,
    stop_deferrals: AtomicU64,
    rejected: Tally<Rejected>,
    latency_open: Latency,
    latency_deferred: Latency,
}

/// A guest's upcall mailboxes and pending indicators.
pub struct GuestUpcalls {
    pub(super) name: String,
    /// The mailbox page (in `_mapping`), reached through atomics only.
    page: NonNull<AtomicU32>,
    /// Owns the page: unmapped when the last holder of this value goes, which
    /// is after the guest's vCPU threads (they hold it through the guest's
    /// mechanisms), so no `KVM_RUN` reaches the memslot on it any more. A
    /// guest removed at run time gives the page back this way.
    _mapping: SharedMapping,
    /// The stop watchdog ([`Self::close`]), joined with the vCPU threads.
    watchdog: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(super) vcpus: Vec<VcpuState>,
    pub(super) delivery: Delivery,
    epoch: Instant,
    counters: Counters,
    closed: Mutex<bool>,
    /// The guest's vCPUs, for the poller and the stop watchdog ([`Self::set_vcpus`]).
    handles: OnceLock<Vec<Arc<VcpuShared>>>,
    /// The shim answers the test-only calls (`--test-hypercalls`).
    pub(super) test_calls: AtomicBool,
    /// A storm thread runs: the one a guest may have at a time.
    pub(super) storming: AtomicBool,
    /// Mailbox words already counted as refused, by offset, with the value
    /// seen: a report taken again counts a bad word again only once the
    /// guest has written it anew.
    flagged: Mutex<HashMap<u64, u32>>,
}

// SAFETY: `page` points into `_mapping`, which lives as long as this value and
// is accessed only through atomics.
unsafe impl Send for GuestUpcalls {}
// SAFETY: as above.
unsafe impl Sync for GuestUpcalls {}

/// Failure to set the mailboxes up.
#[derive(Debug, thiserror::Error)]
pub enum UpcallError {
    #[error("mapping the upcall mailbox page: {0}")]
    Map(std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for the upcall mailboxes: {0}")]
    Slot(kvm_ioctls::Error),
    #[error("{0} vCPUs, the mailbox area holds {max}", max = upcall::MAX_VCPUS)]
    TooManyVcpus(usize),
}

/// How often the polling path kicks a vCPU whose upcall waits for IF.
pub const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// How long a stop waits at most for a vCPU's interrupt window.
const STOP_DEFER_LIMIT: Duration = Duration::from_millis(20);

impl GuestUpcalls {
    /// Maps the mailbox page at [`area::UPCALLS`] as memslot [`slot::UPCALLS`] of `vm`.
    pub fn new(
        name: &str,
        vm: &VmFd,
        vcpus: usize,
        delivery: Delivery,
    ) -> Result<Arc<Self>, UpcallError> {
        if vcpus as u64 > upcall::MAX_VCPUS {
            return Err(UpcallError::TooManyVcpus(vcpus));
        }
        let size = area::UPCALLS_SIZE as usize;
        let mapping = SharedMapping::new(size).map_err(UpcallError::Map)?;
        let p = mapping.as_ptr();
        // mmap returns page-aligned memory: aligned for the u32 counters.
        #[allow(clippy::cast_ptr_alignment)]
        let page = NonNull::new(p.cast::<AtomicU32>())
            .ok_or_else(|| UpcallError::Map(std::io::Error::other("mmap returned 0")))?;
        let desc = kvm_userspace_memory_region {
            slot: slot::UPCALLS,
            flags: 0,
            guest_phys_addr: area::UPCALLS,
            memory_size: area::UPCALLS_SIZE,
            userspace_addr: p as u64,
        };
        // SAFETY: the range is `mapping`, owned by the value returned, which
        // outlives every vCPU run of `vm` (see `_mapping`).
        unsafe { vm.set_user_memory_region(desc) }.map_err(UpcallError::Slot)?;
        let me = Self {
            name: name.to_owned(),
            page,
            _mapping: mapping,
            watchdog: Mutex::new(None),
            vcpus: (0..vcpus).map(|_| VcpuState::default()).collect(),
            delivery,
            epoch: Instant::now(),
            counters: Counters::default(),
            closed: Mutex::new(false),
            handles: OnceLock::new(),
            test_calls: AtomicBool::new(false),
            storming: AtomicBool::new(false),
            flagged: Mutex::new(HashMap::new()),
        };
        Ok(Arc::new(me))
    }

    /// The CPUID offer that advertises the mailboxes.
    #[must_use]
    pub fn cpuid_offer() -> Offer {
        Offer {
            feature: features::UPCALLS,
            leaf: discovery::LEAF_UPCALLS,
            regs: discovery::area_registers(
                area::UPCALLS,
                area::UPCALLS_SIZE as u32,
                upcall::VERSION,
            ),
        }
    }

    /// Answers the test-only calls (the ping and the storm) from now on.
    pub fn allow_test_calls(&self) {
        self.test_calls.store(true, Ordering::Relaxed);
    }

    /// How the guest's upcalls wait for a closed window.
    #[must_use]
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The number of vCPUs with a mailbox.
    #[must_use]
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The guest-ending lock: `true` once [`Self::close`] ran. Held across a
    /// kick, it keeps the kicked vCPU thread alive (a vCPU marks itself gone
    /// under it before its thread ends).
    pub(super) fn closed(&self) -> MutexGuard<'_, bool> {
        lock(&self.closed)
    }

    /// At the guest's start: its vCPUs (by index) for kicks.
    pub fn set_vcpus(&self, vcpus: Vec<Arc<VcpuShared>>) {
        let _ = self.handles.set(vcpus);
    }

    /// The guest says (`UpcallEnable`) that vCPU `vcpu`'s LINT0 takes `ExtINT`:
    /// guest-wide classes may go there.
    pub fn enable(&self, vcpu: u32) {
        if let Some(s) = self.vcpus.get(vcpu as usize) {
            s.takes.store(true, Ordering::Release);
            // The guest may make this call as often as it likes.
            crate::guest_log!(debug, guest = %self.name, vcpu, "upcalls enabled");
        }
    }

    fn word(&self, offset: u64) -> &AtomicU32 {
        debug_assert!(offset + 4 <= area::UPCALLS_SIZE && offset.is_multiple_of(4));
        // SAFETY: in-bounds (the offset helpers of para_abi::upcall bound the vCPU
        // index, the constructor bounds the vCPU count), 4-aligned, and the page
        // lives for the process; the guest writes it concurrently, hence atomics.
        unsafe { &*self.page.as_ptr().add(offset as usize / 4) }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    pub(super) fn reject(&self, r: Rejected, what: std::fmt::Arguments<'_>) {
        self.counters
            .rejected
            .reject(r, &self.name, "upcalls", what);
    }

    /// Posts `n` upcalls of `class` to vCPU `vcpu` and kicks it; false (and
    /// nothing posted) when there is no such vCPU.
    pub fn post(&self, vcpu: u32, class: UpcallClass, n: u64, kick: impl FnOnce()) -> bool {
        let Some(s) = self.vcpus.get(vcpu as usize) else {
            return false;
        };
        let _ = s.oldest_post_ns.compare_exchange(
            0,
            self.now_ns(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        s.requested[class as usize].fetch_add(n, Ordering::AcqRel);
        self.counters.requested[class as usize].fetch_add(n, Ordering::Relaxed);
        // Dekker with `service_vcpu` (SeqCst on both sides): either the vCPU
        // thread sees `pending`, or this sees `armed` clear and kicks.
        s.pending.store(true, Ordering::SeqCst);
        if self.delivery == Delivery::Window && s.armed.load(Ordering::SeqCst) {
            // The vCPU runs with the window request armed: its window-open exit
            // will publish this post too, so a kick would only add an exit.
            self.counters.kicks_saved.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        kick();
        true
    }

    /// The pending-event check before a `KVM_RUN` of vCPU `vcpu` (see the module
    /// comment). Returns whether the window request must stay armed for upcalls.
    pub fn service(&self, fd: &mut VcpuFd, vcpu: u32) -> bool {
        let Some(s) = self.vcpus.get(vcpu as usize) else {
            return false;
        };
        let stop_wait = s.stop_wait.swap(false, Ordering::Relaxed);
        self.service_vcpu(fd, vcpu, s) || stop_wait
    }

    fn service_vcpu(&self, fd: &mut VcpuFd, vcpu: u32, s: &VcpuState) -> bool {
        let run = fd.get_kvm_run();
        let window_exit = run.exit_reason == KVM_EXIT_IRQ_WINDOW_OPEN;
        // A KVM_RUN refused at once for `immediate_exit` leaves exit_reason as it
        // was: clear it so that one window exit is never counted twice.
        run.exit_reason = kvm_bindings::KVM_EXIT_UNKNOWN;
        let armed = s.armed.load(Ordering::Relaxed);
        if window_exit && armed {
            self.counters
                .irq_window_exits
                .fetch_add(1, Ordering::Relaxed);
        }
        if !s.pending.load(Ordering::SeqCst) {
            s.armed.store(false, Ordering::SeqCst);
            // A post that saw `armed` still set did not kick: take it now.
            if !s.pending.load(Ordering::SeqCst) {
                return false;
            }
        }
        let open = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
        if !open {
            return self.wait(s);
        }
        // Publish before injecting, so that the handler the vector runs finds them.
        s.pending.store(false, Ordering::SeqCst);
        let since = s.oldest_post_ns.swap(0, Ordering::AcqRel);
        let mut new = false;
        for c in UpcallClass::ALL {
            let req = s.requested[c as usize].load(Ordering::Acquire);
            if req != s.published[c as usize].load(Ordering::Relaxed) {
                new = true;
                s.published[c as usize].store(req, Ordering::Relaxed);
                if let Some(off) = upcall::posted_offset(vcpu, c) {
                    // The guest sees a wrapping 32-bit count.
                    self.word(off).store(req as u32, Ordering::Release);
                }
            }
        }
        if !new {
            // A post raced with the previous publication and is already out.
            s.armed.store(false, Ordering::SeqCst);
            return s.pending.load(Ordering::SeqCst) && self.wait(s);
        }
        match inject(fd, VECTOR) {
            Ok(()) => {
                // 0: the post that started the wait raced with an earlier publication.
                let waited = (since != 0).then(|| self.now_ns().saturating_sub(since));
                let polled = s.polled.swap(false, Ordering::Relaxed);
                if armed || polled {
                    if polled {
                        &self.counters.injected_after_poll
                    } else {
                        &self.counters.injected_after_window
                    }
                    .fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = waited {
                        self.counters.latency_deferred.add(w);
                    }
                } else {
                    self.counters
                        .injected_immediately
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = waited {
                        self.counters.latency_open.add(w);
                    }
                }
                s.armed.store(false, Ordering::SeqCst);
                // A post that raced with the publication set `pending` again.
                s.pending.load(Ordering::SeqCst) && self.wait(s)
            }
            Err(e) => {
                self.counters.inject_busy.fetch_add(1, Ordering::Relaxed);
                debug!(vcpu, "upcall KVM_INTERRUPT deferred: {e}");
                // The counts are out; the next injection announces them.
                let _ = s.oldest_post_ns.compare_exchange(
                    0,
                    since.max(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                s.pending.store(true, Ordering::Release);
                self.wait(s)
            }
        }
    }

    /// The window is closed (or taken): wait for it the configured way.
    fn wait(&self, s: &VcpuState) -> bool {
        match self.delivery {
            Delivery::Window => {
                s.armed.store(true, Ordering::SeqCst);
                true
            }
            Delivery::Poll | Delivery::Off => {
                s.polled.store(true, Ordering::Relaxed);
                self.counters.poll_reentries.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Scheduling use: the shim wants vCPU `vcpu` stopped. True when the stop must
    /// wait, because its window is closed: the window request is then armed and
    /// the stop retried at the next exit, for at most `STOP_DEFER_LIMIT`.
    pub fn defer_stop(&self, fd: &mut VcpuFd, vcpu: u32) -> bool {
        if self.delivery != Delivery::Window {
            return false;
        }
        let Some(s) = self.vcpus.get(vcpu as usize) else {
            return false;
        };
        let run = fd.get_kvm_run();
        if run.if_flag != 0 && run.ready_for_interrupt_injection != 0 {
            return false;
        }
        let now = self.now_ns();
        let since = match s.stop_deferred_since_ns.load(Ordering::Relaxed) {
            0 => {
                s.stop_deferred_since_ns.store(now, Ordering::Relaxed);
                self.counters.stop_deferrals.fetch_add(1, Ordering::Relaxed);
                now
            }
            t => t,
        };
        if Duration::from_nanos(now - since) > STOP_DEFER_LIMIT {
            return false;
        }
        s.stop_wait.store(true, Ordering::Relaxed);
        true
    }

    /// True when vCPU `vcpu` has enabled upcalls and still runs.
    #[must_use]
    pub fn takes(&self, vcpu: u32) -> bool {
        self.vcpus
            .get(vcpu as usize)
            .is_some_and(|s| s.takes.load(Ordering::Acquire) && !s.gone.load(Ordering::Relaxed))
    }

    /// Posts one upcall of a guest-wide `class` (a doorbell re-designation, a
    /// hint update): to `preferred` when that vCPU takes upcalls, else to the
    /// lowest one that does. `None`, and nothing posted, when no vCPU has
    /// enabled upcalls (yet), the guest has not started or is ending: the
    /// caller then falls back to its own notification, if it has one.
    pub fn post_to_guest(&self, preferred: Option<u32>, class: UpcallClass) -> Option<u32> {
        if self.delivery == Delivery::Off {
            return None;
        }
        // Held across the kick, as in `storm`: no kick reaches a joined vCPU thread.
        let closed = self.closed();
        if *closed {
            return None;
        }
        let handles = self.handles.get()?;
        let vcpu = preferred
            .filter(|&v| self.takes(v))
            .or_else(|| (0..self.vcpus.len() as u32).find(|&v| self.takes(v)))?;
        let h = handles.get(vcpu as usize)?;
        self.post(vcpu, class, 1, || h.kick()).then_some(vcpu)
    }

    /// The guest is ending: storms stop posting and kicking (call before the
    /// vCPU threads are joined).
    /// Also bounds the stop deferral: a vCPU that waits for its window inside
    /// `KVM_RUN` (spinning or halted with IF = 0) gets no exit by itself, so a
    /// watchdog kicks it once `STOP_DEFER_LIMIT` has passed.
    pub fn close(self: &Arc<Self>) {
        {
            let mut closed = self.closed();
            if *closed {
                return;
            }
            *closed = true;
        }
        if self.delivery != Delivery::Window {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-upcall-stop", self.name))
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Helper);
                std::thread::sleep(STOP_DEFER_LIMIT + Duration::from_millis(2));
                let Some(handles) = me.handles.get() else {
                    return;
                };
                // Held across the kicks: a vCPU marks itself gone under this lock
                // before its thread ends, so every vCPU kicked here is alive.
                let _closed = me.closed();
                for (s, v) in me.vcpus.iter().zip(handles) {
                    if !s.gone.load(Ordering::Relaxed)
                        && s.stop_deferred_since_ns.load(Ordering::Relaxed) != 0
                    {
                        v.kick();
                    }
                }
            });
        match spawned {
            Ok(h) => *lock(&self.watchdog) = Some(h),
            Err(e) => warn!(guest = %self.name, "upcall stop watchdog: {e}"),
        }
    }

    /// Waits for the stop watchdog (after the vCPU threads are joined; it
    /// ends `STOP_DEFER_LIMIT` after the stop), so that nothing of the
    /// guest outlives its removal.
    pub fn join_watchdog(&self) {
        let h = lock(&self.watchdog).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// vCPU `vcpu`'s thread leaves its run loop: no more kicks for it.
    pub fn vcpu_gone(&self, vcpu: u32) {
        let _closed = self.closed();
        if let Some(s) = self.vcpus.get(vcpu as usize) {
            s.gone.store(true, Ordering::Relaxed);
        }
    }

    /// True for the offsets of the `posted` and `acked` words of the guest's
    /// vCPUs; every other word of the area stays 0 in an honest guest.
    fn is_counter(&self, off: u64) -> bool {
        let (slot, within) = (off / upcall::SLOT_SIZE, off % upcall::SLOT_SIZE);
        let counters = |start: u64| (start..start + 4 * CLASSES as u64).contains(&within);
        slot < self.vcpus.len() as u64
            && (counters(upcall::POSTED_OFFSET) || counters(upcall::ACKED_OFFSET))
    }

    /// True the first time the word at `off` is seen bad with value `v`.
    fn first_sight(&self, off: u64, v: u32) -> bool {
        lock(&self.flagged).insert(off, v) != Some(v)
    }

    /// The report, with deliveries read back from the guest's acknowledgements.
    #[must_use]
    pub fn report(&self) -> UpcallReport {
        let c = &self.counters;
        let mut delivered = [0u64; CLASSES];
        for (v, s) in self.vcpus.iter().enumerate() {
            for cl in UpcallClass::ALL {
                let Some(off) = upcall::acked_offset(v as u32, cl) else {
                    continue;
                };
                let acked = u64::from(self.word(off).load(Ordering::Acquire));
                let published = s.published[cl as usize].load(Ordering::Relaxed);
                // Counts wrap at 32 bits in the mailbox; rebuild the full count.
                let full = (published & !0xFFFF_FFFF) | acked;
                let full = if full > published {
                    full.wrapping_sub(1 << 32)
                } else {
                    full
                };
                if full > published {
                    if self.first_sight(off, acked as u32) {
                        self.reject(
                            Rejected::AckAhead,
                            format_args!(
                                "vCPU {v} {} acked {acked}, {published} posted",
                                cl.name()
                            ),
                        );
                    }
                    continue;
                }
                delivered[cl as usize] += full;
            }
        }
        for off in (0..area::UPCALLS_SIZE).step_by(4) {
            if self.is_counter(off) {
                continue;
            }
            let v = self.word(off).load(Ordering::Acquire);
            if v != 0 && self.first_sight(off, v) {
                self.reject(
                    Rejected::StrayWrite,
                    format_args!("{v:#x} at mailbox offset {off:#x}, which is no vCPU's counter"),
                );
            }
        }
        let by_class = |a: [u64; CLASSES]| {
            UpcallClass::ALL
                .iter()
                .map(|cl| (cl.name(), a[*cl as usize]))
                .collect()
        };
        let requested = std::array::from_fn(|i| c.requested[i].load(Ordering::Relaxed));
        UpcallReport {
            offered: true,
            delivery: self.delivery,
            requested: by_class(requested),
            delivered: by_class(delivered),
            injected_immediately: c.injected_immediately.load(Ordering::Relaxed),
            injected_after_window: c.injected_after_window.load(Ordering::Relaxed),
            injected_after_poll: c.injected_after_poll.load(Ordering::Relaxed),
            irq_window_exits: c.irq_window_exits.load(Ordering::Relaxed),
            poll_reentries: c.poll_reentries.load(Ordering::Relaxed),
            inject_busy: c.inject_busy.load(Ordering::Relaxed),
            kicks_saved: c.kicks_saved.load(Ordering::Relaxed),
            stop_deferrals: c.stop_deferrals.load(Ordering::Relaxed),
            latency_open: c.latency_open.report(),
            latency_deferred: c.latency_deferred.report(),
            rejected: c.rejected.all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(u: &GuestUpcalls, off: u64, v: u32) {
        u.word(off).store(v, Ordering::Release);
    }

    /// Acknowledgements ahead of what was posted and words that are no
    /// vCPU's counter are each counted once, however often the report is
    /// taken, and again once the guest writes them anew.
    #[test]
    fn hostile_mailbox_writes_are_counted_once_each() {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let u = GuestUpcalls::new("t", &vm, 2, Delivery::Window).unwrap();
        let acked = |v, cl| upcall::acked_offset(v, cl).unwrap();
        store(&u, acked(0, UpcallClass::Ping), 1000);
        store(&u, acked(1, UpcallClass::HintUpdate), 7);
        // Slot padding, and the slot of a vCPU the guest does not have.
        store(&u, 16, 0xAA);
        store(&u, upcall::SLOT_SIZE - 4, 0xBB);
        store(&u, acked(5, UpcallClass::Ping), 1);
        store(
            &u,
            upcall::posted_offset(9, UpcallClass::VmqArrival).unwrap(),
            2,
        );
        let r = u.report();
        assert_eq!(r.rejected["ack_ahead"], 2);
        assert_eq!(r.rejected["stray_write"], 4);
        assert_eq!(r.delivered["ping"], 0, "an ack ahead delivers nothing");
        let again = u.report();
        assert_eq!(again.rejected, r.rejected, "nothing new was written");
        store(&u, acked(0, UpcallClass::Ping), 1001);
        store(&u, 16, 0xAB);
        let r = u.report();
        assert_eq!(r.rejected["ack_ahead"], 3);
        assert_eq!(r.rejected["stray_write"], 5);
        // The guest's own counters of an existing vCPU are no stray words.
        store(&u, acked(1, UpcallClass::HintUpdate), 0);
        store(&u, upcall::posted_offset(1, UpcallClass::Ping).unwrap(), 0);
        assert_eq!(u.report().rejected, r.rejected);
    }
}
