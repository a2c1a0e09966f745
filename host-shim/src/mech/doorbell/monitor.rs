//! M1 monitor threads: one per host CPU in use, pinned there,
//! consuming every ring designated to that CPU, of every guest.
//!
//! The loop: serve each ring in turn — at most [`BATCH`] records, then its overflow
//! set — so one flooding guest delays the others by one batch at most. When a whole
//! pass found nothing, spin with `pause` (`core::hint::spin_loop`) until the spin
//! budget (`--doorbell-spin-us`) runs out, then park every ring (publish `PARKED`,
//! re-check) and sleep in `epoll_wait` on all their kick eventfds and a stop eventfd,
//! with a timeout so that shutdown is noticed even if the stop write were lost.
//! Woken, it counts the kicks, un-parks every ring and goes on.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use para_abi::doorbell::{Consumer, Park, Polled};
use tracing::{info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::GuestDoorbells;
use super::idle_spin::{self, Priority, Shared, SpinClass, Watch, WatchShared};
use super::manager::ParaRegion;
use super::report::MonitorReport;

/// Most records taken from one ring before the monitor looks at the next.
pub const BATCH: usize = 256;
/// Default spin budget before parking, in µs (`--doorbell-spin-us`): long enough to
/// catch back-to-back notifications of a busy guest, short enough that an idle
/// monitor costs a 2-core machine ~nothing (it sleeps after 50 µs of silence).
pub const DEFAULT_SPIN_US: u64 = 50;
/// Default ceiling of the adaptive spin budget, in µs (`--doorbell-spin-max-us`).
pub const DEFAULT_SPIN_MAX_US: u64 = 1000;
/// Longest sleep before the monitor re-checks its stop flag.
const SLEEP_TIMEOUT_MS: i32 = 100;
const STOP_TOKEN: u64 = u64::MAX;

/// One ring as its monitor consumes it.
pub struct RingTask {
    pub region: Arc<ParaRegion>,
    /// The designation (and ring) index in `region`.
    pub index: usize,
    pub guest: Arc<GuestDoorbells>,
    pub kick: EventFd,
    consumer: Consumer,
    /// Host threads write this range (`host_lane`), not the guest.
    host: bool,
    /// The guest asks the monitor to keep polling instead of parking (M4 flag
    /// "keep polling my doorbell range", M4).
    pub keep_polling: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl RingTask {
    /// The task for designation `index` of `region`; the ring must be fresh
    /// (`ParaRegion::new` reset it).
    pub fn new(
        region: Arc<ParaRegion>,
        index: usize,
        guest: Arc<GuestDoorbells>,
    ) -> std::io::Result<Self> {
        let kick = region
            .kicks
            .get(index)
            .ok_or_else(|| std::io::Error::other("no such designation"))?
            .try_clone()?;
        let host = region
            .plan
            .designations
            .get(index)
            .is_some_and(|d| !d.guest_writes());
        Ok(Self {
            region,
            index,
            guest,
            kick,
            consumer: Consumer::new(),
            host,
            keep_polling: None,
        })
    }

    /// Takes up to `batch` records, then drains the overflow set once. Returns how
    /// many records and overflow entries it handled.
    pub fn serve(&mut self, batch: usize) -> usize {
        self.serve_raising(batch, &mut || {})
    }

    /// [`Self::serve`], calling `before_work` before the first event: the
    /// events' queue work may run on this thread (run to completion), which
    /// must not do it at the idle priority it spins at.
    pub fn serve_raising(&mut self, batch: usize, before_work: &mut dyn FnMut()) -> usize {
        let Some(ring) = self.region.ring(self.index) else {
            return 0;
        };
        let mut n = 0;
        while n < batch {
            match self.consumer.poll(&ring) {
                Polled::Event(e) => {
                    if n == 0 {
                        before_work();
                    }
                    crate::breakdown::NOTIFY_SEEN.store(crate::breakdown::now(), Ordering::Relaxed);
                    if self.host {
                        self.guest.host_event(e);
                    } else {
                        self.guest.event(e);
                    }
                }
                Polled::Rejected(r) => self.guest.rejected(r.reason),
                Polled::Empty => break,
            }
            n += 1;
        }
        let guest = &self.guest;
        n + self.consumer.drain_overflow(&ring, |p| guest.pending(p))
    }

    fn park(&self) -> Park {
        self.region
            .ring(self.index)
            .map_or(Park::Retry, |r| self.consumer.park(&r))
    }

    fn unpark(&self) {
        if let Some(r) = self.region.ring(self.index) {
            self.consumer.unpark(&r);
        }
    }

    /// Adds what the kick eventfd counted to the guest's fallback kicks (or,
    /// for a host-written range, to the host producers' wake-ups).
    fn count_kicks(&self) {
        if let Ok(n) = self.kick.read() {
            let c = &self.guest.counters;
            if self.host {
                &c.host_kicks
            } else {
                &c.fallback_kicks
            }
            .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Parks this ring alone (tests of producers): true when it parked.
    #[cfg(test)]
    pub(crate) fn park_for_test(&self) -> bool {
        self.park() == Park::Sleep
    }

    #[cfg(test)]
    pub(crate) fn count_kicks_for_test(&self) {
        self.count_kicks();
    }
}

/// Serves every task once; returns the work done.
pub fn serve_all(tasks: &mut [RingTask], batch: usize) -> usize {
    tasks.iter_mut().map(|t| t.serve(batch)).sum()
}

/// Parks every ring; true when all agreed to sleep. On false every ring runs again.
fn park_all(tasks: &[RingTask]) -> bool {
    for (i, t) in tasks.iter().enumerate() {
        if t.park() == Park::Retry {
            tasks[..i].iter().for_each(RingTask::unpark);
            return false;
        }
    }
    true
}

/// The adaptive spin budget: between `min` (`--doorbell-spin-us`) and `max`
/// (`--doorbell-spin-max-us`). It doubles when spinning paid off (an event came
/// while spinning) or when parking did not (a kick woke the monitor sooner than
/// `max` after it parked: it would have caught that event spinning), and drops
/// back to `min` after a sleep longer than `max` (the guests went quiet). So an
/// idle host spins `min` per wake-up at most once per sleep timeout, and a busy
/// guest keeps its monitor spinning up to `max` between events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpinBudget {
    min: Duration,
    max: Duration,
    now: Duration,
}

impl SpinBudget {
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            now: min,
        }
    }

    #[must_use]
    pub const fn current(&self) -> Duration {
        self.now
    }

    fn grow(&mut self) {
        self.now = self
            .now
            .saturating_mul(2)
            .max(Duration::from_micros(1))
            .min(self.max);
    }

    /// Work arrived after `spun` of spinning (zero: the ring was never empty).
    pub fn work_after(&mut self, spun: Duration) {
        if !spun.is_zero() {
            self.grow();
        }
    }

    /// The monitor woke after sleeping `slept` (by a kick or the timeout).
    pub fn woke_after(&mut self, slept: Duration) {
        if slept < self.max {
            self.grow();
        } else {
            self.now = self.min;
        }
    }
}

/// The running monitors.
pub struct Monitors {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    threads: Vec<JoinHandle<()>>,
    shared: Vec<(usize, usize, Arc<Shared>)>,
    class: SpinClass,
    watch: Option<Watch>,
}

impl Monitors {
    /// Starts one thread per `(cpu, tasks)`, pinned to `cpu`, spinning at `class`.
    pub fn start(
        per_cpu: Vec<(usize, Vec<RingTask>)>,
        spin: SpinBudget,
        class: SpinClass,
    ) -> std::io::Result<Self> {
        let class = if class == SpinClass::Idle && !idle_spin::can_leave_idle() {
            warn!(
                "monitors spin at normal priority: leaving SCHED_IDLE needs CAP_SYS_NICE or \
                 RLIMIT_NICE 20 (--doorbell-spin-class normal silences this)"
            );
            SpinClass::Normal
        } else {
            class
        };
        let shared: Vec<(usize, usize, Arc<Shared>)> = per_cpu
            .iter()
            .map(|(cpu, t)| (*cpu, t.len(), Arc::new(Shared::default())))
            .collect();
        let watch = if class == SpinClass::Idle && !per_cpu.is_empty() {
            Some(Watch::start(
                shared.iter().map(|(_, _, s)| s.clone()).collect(),
            )?)
        } else {
            None
        };
        let watch_shared = watch
            .as_ref()
            .map_or_else(|| Arc::new(WatchShared::default()), Watch::shared);
        let mut me = Self {
            stop: Arc::new(AtomicBool::new(false)),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            threads: Vec::new(),
            shared,
            class,
            watch,
        };
        for ((cpu, tasks), (_, _, sh)) in per_cpu.into_iter().zip(&me.shared) {
            let stop = me.stop.clone();
            let wake = me.wake.try_clone()?;
            let (sh, ws) = (sh.clone(), watch_shared.clone());
            let h = std::thread::Builder::new()
                .name(format!("monitor-cpu{cpu}"))
                .spawn(move || {
                    crate::seccomp::install_or_exit(crate::seccomp::Kind::Monitor);
                    let prio = Priority::new(class, sh, ws);
                    run(cpu, tasks, spin, &stop, &wake, prio);
                })?;
            me.threads.push(h);
        }
        Ok(me)
    }

    /// Stops and joins every monitor (after the guests ended); their figures.
    #[must_use]
    pub fn shutdown(mut self) -> Vec<MonitorReport> {
        self.stop.store(true, Ordering::Release);
        // A counter write never blocks below u64::MAX - 1; every monitor sees it.
        let _ = self.wake.write(1);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        drop(self.watch.take());
        self.shared
            .iter()
            .map(|(cpu, rings, s)| MonitorReport {
                cpu: *cpu,
                rings: *rings,
                spin_class: self.class.name(),
                idle_spins: s.idle_spins.load(Ordering::Relaxed),
                starved_boosts: s.starved_boosts.load(Ordering::Relaxed),
                parks: s.parks.load(Ordering::Relaxed),
                served: s.served.load(Ordering::Relaxed),
            })
            .collect()
    }
}

fn run(
    cpu: usize,
    mut tasks: Vec<RingTask>,
    mut spin: SpinBudget,
    stop: &AtomicBool,
    wake: &EventFd,
    mut prio: Priority,
) {
    if let Err(e) = crate::vcpu::handle::pin_current_thread(cpu) {
        warn!(cpu, "pinning the doorbell monitor failed: {e}");
    }
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            warn!(cpu, "epoll_create failed ({e}): the monitor will only spin");
            return spin_only(&mut tasks, stop);
        }
    };
    let mut ok = epoll
        .ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )
        .is_ok();
    for (i, t) in tasks.iter().enumerate() {
        ok &= epoll
            .ctl(
                ControlOperation::Add,
                t.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )
            .is_ok();
    }
    if !ok {
        warn!(cpu, "epoll_ctl failed: the monitor will only spin");
        return spin_only(&mut tasks, stop);
    }
    info!(
        cpu,
        rings = tasks.len(),
        spin_us = spin.min.as_micros() as u64,
        spin_max_us = spin.max.as_micros() as u64,
        "doorbell monitor running"
    );
    let mut events = vec![EpollEvent::default(); tasks.len() + 1];
    let mut idle_since: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        prio.beat();
        let served: usize = tasks
            .iter_mut()
            .map(|t| t.serve_raising(BATCH, &mut || prio.parking()))
            .sum();
        if served > 0 {
            prio.served(served);
            if let Some(since) = idle_since.take() {
                spin.work_after(since.elapsed());
            }
            continue;
        }
        prio.spinning();
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < spin.current() {
            wait_a_little(&tasks);
            continue;
        }
        if tasks
            .iter()
            .any(|t| t.keep_polling.as_ref().is_some_and(|f| f()))
        {
            core::hint::spin_loop();
            continue;
        }
        idle_since = None;
        // Normal priority before parking: an idle-priority thread woken by a kick
        // would wait for its CPU to fall idle.
        prio.parking();
        if !park_all(&tasks) {
            continue;
        }
        prio.parked();
        let parked = Instant::now();
        match epoll.wait(SLEEP_TIMEOUT_MS, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => warn!(cpu, "epoll_wait: {e}"),
        }
        spin.woke_after(parked.elapsed());
        tasks.iter().for_each(RingTask::count_kicks);
        tasks.iter().for_each(RingTask::unpark);
    }
    // Out of the watch's sight before the thread ends: a frozen heartbeat at
    // idle priority would look starved.
    prio.parking();
    // Last words: whatever is still in the rings, and the kicks not yet counted.
    serve_all(&mut tasks, usize::MAX);
    tasks.iter().for_each(RingTask::count_kicks);
}

/// One step of the spin: with WAITPKG and a single ring, UMWAIT on the line its
/// producers write (a few µs at most); else a `pause`.
fn wait_a_little(tasks: &[RingTask]) {
    if let [only] = tasks
        && super::waitpkg::available()
        && let Some(ring) = only.region.ring(only.index)
    {
        let tail = std::ptr::from_ref(&ring.header().tail).cast::<u8>();
        // SAFETY: WAITPKG is present (checked); `tail` points into the ring's
        // mapping, which the region keeps for the monitor's life.
        unsafe { super::waitpkg::wait_for_write(tail) };
    } else {
        core::hint::spin_loop();
    }
}

/// Without epoll: serve and yield the CPU between passes (degraded but live).
fn spin_only(tasks: &mut [RingTask], stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        if serve_all(tasks, BATCH) == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    tasks.iter().for_each(RingTask::count_kicks);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mech::doorbell::Target;
    use para_abi::doorbell::device::SINK;
    use para_abi::doorbell::ring::{PARKED, RUNNING};
    use para_abi::doorbell::{Event, Op, Via};

    fn setup() -> (Arc<ParaRegion>, Arc<GuestDoorbells>, Vec<EventFd>) {
        let region = crate::mech::doorbell::manager::test_region();
        let fds: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let guest = Arc::new(GuestDoorbells::new(
            "t",
            vec![Target {
                device: 1,
                queues: fds.iter().map(|f| f.try_clone().unwrap()).collect(),
                inline: None,
            }],
        ));
        (region, guest, fds)
    }

    #[test]
    fn garbage_unknowns_sink_and_real_queues() {
        let (region, guest, fds) = setup();
        let mut task = RingTask::new(region.clone(), 0, guest.clone()).unwrap();
        let ring = region.ring(0).unwrap();
        let _ = ring.send(Event::new(SINK, 0, Op::Notify));
        let _ = ring.send(Event::new(1, 1, Op::TxKick));
        let _ = ring.send(Event::new(5, 0, Op::Notify));
        // A guest scribbling raw words into the next slots it never reserved.
        let slots_base = std::ptr::from_ref(ring.header()).cast::<u8>();
        // SAFETY: the slots follow the 256-byte header (64-byte aligned, so the
        // slots are 8-byte aligned) inside the ring's range.
        #[allow(clippy::cast_ptr_alignment)]
        let slots = unsafe {
            std::slice::from_raw_parts(
                slots_base.add(256).cast::<std::sync::atomic::AtomicU64>(),
                8,
            )
        };
        slots[3].store(0xDEAD_BEEF_DEAD_BEEF, Ordering::Relaxed);
        slots[4].store(Event::new(1, 0, Op::Notify).encode(99), Ordering::Relaxed);
        ring.header().tail.0.store(5, Ordering::Relaxed);
        assert_eq!(task.serve(BATCH), 5);
        let s = guest.snapshot();
        assert_eq!((s.events, s.sink_events), (1, 1));
        assert_eq!(s.rejected["unknown_device"], 1);
        assert_eq!(s.rejected["bad_check"], 1);
        assert_eq!(s.rejected["wrong_sequence"], 1);
        assert_eq!(fds[1].read().unwrap(), 1);
        assert!(fds[0].read().is_err());
        assert_eq!(ring.status().head.load(Ordering::Relaxed), 5);
        assert_eq!(task.serve(BATCH), 0);
    }

    #[test]
    fn batches_are_bounded_and_overflow_is_drained_each_batch() {
        let (region, guest, fds) = setup();
        let mut task = RingTask::new(region.clone(), 0, guest.clone()).unwrap();
        let ring = region.ring(0).unwrap();
        let cap = ring.capacity();
        let mut overflowed = 0;
        for _ in 0..cap + 10 {
            if ring.send(Event::new(SINK, 0, Op::Notify)).via == Via::Overflow {
                overflowed += 1;
            }
        }
        assert_eq!(overflowed, 10);
        let _ = ring.send(Event::new(1, 0, Op::RxRefill));
        // First batch: BATCH records plus the two overflow entries (sink, NIC rx).
        assert_eq!(task.serve(BATCH), BATCH + 2);
        let s = guest.snapshot();
        assert_eq!(s.sink_events, BATCH as u64);
        assert_eq!((s.overflow_drained, s.overflow_notified), (2, 1));
        assert_eq!(fds[0].read().unwrap(), 1);
        let mut rest = 0;
        loop {
            let n = task.serve(BATCH);
            assert!(n <= BATCH);
            if n == 0 {
                break;
            }
            rest += n;
        }
        assert_eq!(BATCH + rest, cap as usize);
        assert_eq!(guest.snapshot().sink_events, cap);
    }

    #[test]
    fn park_and_kick_handshake() {
        let (region, guest, _fds) = setup();
        let task = RingTask::new(region.clone(), 0, guest.clone()).unwrap();
        let tasks = vec![task];
        let ring = region.ring(0).unwrap();
        assert!(park_all(&tasks));
        assert_eq!(ring.status().parked.load(Ordering::Relaxed), PARKED);
        // The guest sends: it sees PARKED and must kick (once).
        assert!(ring.send(Event::new(SINK, 0, Op::Notify)).kick);
        assert!(!ring.send(Event::new(SINK, 0, Op::Notify)).kick);
        region.kicks[0].write(1).unwrap();
        tasks.iter().for_each(RingTask::count_kicks);
        tasks.iter().for_each(RingTask::unpark);
        assert_eq!(ring.status().parked.load(Ordering::Relaxed), RUNNING);
        assert_eq!(guest.snapshot().fallback_kicks, 1);
        // Work pending: parking is refused.
        assert!(!park_all(&tasks));
        assert_eq!(ring.status().parked.load(Ordering::Relaxed), RUNNING);
    }

    #[test]
    fn spin_budget_grows_when_busy_and_resets_when_idle() {
        let us = Duration::from_micros;
        let mut b = SpinBudget::new(us(50), us(400));
        b.work_after(Duration::ZERO);
        assert_eq!(b.current(), us(50), "never idle: nothing learnt");
        b.work_after(us(10));
        assert_eq!(b.current(), us(100));
        b.woke_after(us(200)); // a kick soon after parking
        assert_eq!(b.current(), us(200));
        b.work_after(us(150));
        b.work_after(us(150));
        assert_eq!(b.current(), us(400), "capped at max");
        b.woke_after(Duration::from_millis(100)); // the sleep timed out: idle
        assert_eq!(b.current(), us(50));
        // max below min: a fixed budget.
        let mut f = SpinBudget::new(us(50), us(10));
        f.work_after(us(5));
        assert_eq!(f.current(), us(50));
    }

    #[test]
    fn a_monitor_thread_consumes_and_stops() {
        for class in [SpinClass::Idle, SpinClass::Normal] {
            consumes_and_stops(class);
        }
    }

    fn consumes_and_stops(class: SpinClass) {
        let (region, guest, _fds) = setup();
        let task = RingTask::new(region.clone(), 0, guest.clone()).unwrap();
        let m = Monitors::start(
            vec![(0, vec![task])],
            SpinBudget::new(Duration::from_micros(50), Duration::from_micros(500)),
            class,
        )
        .unwrap();
        let ring = region.ring(0).unwrap();
        for i in 0..10_000u32 {
            let sent = ring.send(Event {
                device: SINK,
                queue: 0,
                op: Op::Notify,
                arg: i as u16,
            });
            if sent.kick {
                region.kicks[0].write(1).unwrap();
            }
            while ring.header().tail.0.load(Ordering::Relaxed)
                - ring.status().head.load(Ordering::Relaxed)
                > 1024
            {
                std::thread::yield_now();
            }
        }
        let t0 = Instant::now();
        while guest.snapshot().sink_events + guest.snapshot().overflow_drained < 10_000
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let report = m.shutdown();
        let s = guest.snapshot();
        assert_eq!(s.sink_events, 10_000, "{class:?}: {s:?}");
        assert_eq!(report.len(), 1);
        assert_eq!((report[0].cpu, report[0].rings), (0, 1));
        if class == SpinClass::Normal || !idle_spin::can_leave_idle() {
            assert_eq!(report[0].spin_class, "normal");
            assert_eq!(report[0].idle_spins, 0);
        } else {
            assert_eq!(report[0].spin_class, "idle");
            assert!(report[0].idle_spins > 0, "{report:?}");
        }
    }
}
