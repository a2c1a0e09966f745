//! Spinning at the host's idle priority, with a watch against starvation.
//!
//! A monitor spinning at normal priority takes half of a host CPU from the vCPU
//! thread it shares it with: on a 2-core machine, where each monitor shares a CPU
//! with some guest's busiest vCPU, that cost ~45% of the ping-pong's round trips
//! (docs/m1-doorbells.md). A `SCHED_IDLE` thread (sched(7)) runs only when nothing
//! else on its CPU wants to: it spins on time the CPU would otherwise spend idle,
//! and a waking vCPU thread preempts it at once.
//!
//! The price is starvation: on a CPU kept busy by a vCPU (a guest busy-polling, or
//! computing) an idle-priority monitor gets almost no CPU (CFS weighs it 3 against
//! the vCPU thread's 1024), and the events it owes go unserved. So:
//!
//! - a monitor spins at idle priority, and returns to normal priority before it
//!   parks, so that the kick which wakes it preempts like any other wake-up;
//! - [`Watch`], one thread of normal priority, checks every [`PERIOD`] while some
//!   monitor spins at idle priority: a monitor whose heartbeat did not move over a
//!   whole period was starved, and the watch raises it to normal priority for the
//!   rest of that spin (counted as `starved_boosts`). The worst an event waits for
//!   a starved monitor is about two periods.
//!
//! Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 (sched(7),
//! "SCHED_IDLE"); without them monitors spin at normal priority and say so.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use tracing::{info, warn};

/// How often the watch looks at the monitors spinning at idle priority.
pub const PERIOD: Duration = Duration::from_millis(1);
/// The watch's sleep while no monitor spins at idle priority (it is woken sooner
/// when one starts; the timeout only bounds how late it sees the stop flag).
const IDLE_SLEEP: Duration = Duration::from_millis(100);

/// The priority a monitor spins at (`--doorbell-spin-class`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpinClass {
    /// `SCHED_IDLE` while spinning, normal while parked or starved (the default).
    Idle,
    /// Normal priority throughout (the behaviour before `Idle` existed).
    Normal,
}

impl SpinClass {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Normal => "normal",
        }
    }

    /// Parses the command line's `idle` or `normal`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(Self::Idle),
            "normal" => Ok(Self::Normal),
            other => Err(format!("expected idle or normal, got {other:?}")),
        }
    }
}

/// Whether this process may leave `SCHED_IDLE` again once a thread entered it
/// (sched(7): `CAP_SYS_NICE`, or `RLIMIT_NICE` allowing the thread's nice value).
#[must_use]
pub fn can_leave_idle() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call to fill.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &raw mut lim) } == 0;
    // Nice 0 needs a limit of 20 - 0 (getrlimit(2), RLIMIT_NICE).
    ok && lim.rlim_cur >= 20
}

/// Sets thread `tid`'s policy (0: the calling thread) to `SCHED_IDLE` or back to
/// `SCHED_OTHER`.
fn set_idle(tid: libc::pid_t, idle: bool) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: `param` is a valid sched_param (priority 0, as both policies
    // require); `tid` is 0 or a thread id of this process.
    let r = unsafe { libc::sched_setscheduler(tid, policy, &raw const param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

const RUNNING: u8 = 0;
const IDLE_SPIN: u8 = 1;
const BOOSTED: u8 = 2;

/// What one monitor shares with the watch.
#[derive(Debug, Default)]
pub struct Shared {
    tid: AtomicI32,
    state: AtomicU8,
    /// The monitor's loop passes, published on every pass.
    heartbeat: AtomicU64,
    /// Times the watch found the monitor starved and raised it.
    pub starved_boosts: AtomicU64,
    /// Spins started at idle priority.
    pub idle_spins: AtomicU64,
    /// Times the monitor parked.
    pub parks: AtomicU64,
    /// Ring records and overflow entries it consumed, over all its rings.
    pub served: AtomicU64,
}

/// The monitor's side: keeps its thread's priority in step with its phase.
pub struct Priority {
    class: SpinClass,
    shared: Arc<Shared>,
    watch: Arc<WatchShared>,
    /// This thread is (or was, until the watch raised it) at `SCHED_IDLE`.
    idle: bool,
    /// Loop passes so far; only this thread writes `shared.heartbeat`, so a plain
    /// store publishes it (no locked read-modify-write in the spin loop).
    beats: u64,
}

impl Priority {
    /// For the calling thread, which is the monitor's.
    #[must_use]
    pub fn new(class: SpinClass, shared: Arc<Shared>, watch: Arc<WatchShared>) -> Self {
        shared.tid.store(gettid(), Ordering::Relaxed);
        Self {
            class,
            shared,
            watch,
            idle: false,
            beats: 0,
        }
    }

    /// One pass of the monitor's loop (the watch's sign of life).
    pub fn beat(&mut self) {
        self.beats = self.beats.wrapping_add(1);
        self.shared.heartbeat.store(self.beats, Ordering::Relaxed);
    }

    /// The monitor consumed `n` records or overflow entries.
    pub fn served(&self, n: usize) {
        self.shared.served.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The monitor parked.
    pub fn parked(&self) {
        self.shared.parks.fetch_add(1, Ordering::Relaxed);
    }

    /// The rings went empty: spin at idle priority (no-op when already there).
    pub fn spinning(&mut self) {
        if self.class != SpinClass::Idle || self.idle {
            return;
        }
        match set_idle(0, true) {
            Ok(()) => {
                self.idle = true;
                self.shared.state.store(IDLE_SPIN, Ordering::Release);
                self.shared.idle_spins.fetch_add(1, Ordering::Relaxed);
                self.watch.wake();
            }
            Err(e) => {
                warn!("SCHED_IDLE refused ({e}): this monitor spins at normal priority");
                self.class = SpinClass::Normal;
            }
        }
    }

    /// About to park: back to normal priority, so that a kick wakes it promptly.
    pub fn parking(&mut self) {
        if !self.idle {
            return;
        }
        self.idle = false;
        // BOOSTED: the watch has raised (or is raising) the thread already.
        if self.shared.state.swap(RUNNING, Ordering::AcqRel) == IDLE_SPIN
            && let Err(e) = set_idle(0, false)
        {
            // Cannot happen when `can_leave_idle` held; say so if it does.
            warn!("leaving SCHED_IDLE failed: {e}");
        }
    }
}

/// What the monitors share with the watch thread.
#[derive(Debug, Default)]
pub struct WatchShared {
    thread: OnceLock<Thread>,
    stop: AtomicBool,
}

impl WatchShared {
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// The watch thread.
pub struct Watch {
    shared: Arc<WatchShared>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Starts watching `monitors`.
    pub fn start(monitors: Vec<Arc<Shared>>) -> std::io::Result<Self> {
        let shared = Arc::new(WatchShared::default());
        let s = shared.clone();
        let h = std::thread::Builder::new()
            .name("monitor-watch".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Monitor);
                watch(&monitors, &s);
            })?;
        let _ = shared.thread.set(h.thread().clone());
        Ok(Self {
            shared,
            thread: Some(h),
        })
    }

    /// What the monitors need to wake the watch.
    #[must_use]
    pub fn shared(&self) -> Arc<WatchShared> {
        self.shared.clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

fn watch(monitors: &[Arc<Shared>], shared: &WatchShared) {
    let beats = || -> Vec<u64> {
        monitors
            .iter()
            .map(|m| m.heartbeat.load(Ordering::Relaxed))
            .collect()
    };
    let mut last = beats();
    let mut logged = false;
    while !shared.stop.load(Ordering::Acquire) {
        if !monitors
            .iter()
            .any(|m| m.state.load(Ordering::Acquire) == IDLE_SPIN)
        {
            std::thread::park_timeout(IDLE_SLEEP);
            last = beats();
            continue;
        }
        std::thread::sleep(PERIOD);
        for (m, l) in monitors.iter().zip(&mut last) {
            let beat = m.heartbeat.load(Ordering::Relaxed);
            let starved = beat == *l;
            *l = beat;
            if !starved
                || m.state
                    .compare_exchange(IDLE_SPIN, BOOSTED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                continue;
            }
            match set_idle(m.tid.load(Ordering::Relaxed), false) {
                Ok(()) => {
                    m.starved_boosts.fetch_add(1, Ordering::Relaxed);
                    if !logged {
                        logged = true;
                        info!(
                            "a doorbell monitor got no CPU for {PERIOD:?} at idle priority: \
                             raised to normal until it parks (counted as starved_boosts)"
                        );
                    }
                }
                Err(e) => crate::guest_log!(warn, "raising a starved monitor failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_parse_and_name() {
        for c in [SpinClass::Idle, SpinClass::Normal] {
            assert_eq!(SpinClass::parse(c.name()), Ok(c));
        }
        assert!(SpinClass::parse("fifo").is_err());
    }

    /// A thread at idle priority, pinned beside a busy thread of normal priority,
    /// gets (next to) no CPU: the watch must notice and raise it.
    #[test]
    fn a_starved_idle_spinner_is_raised() {
        if !can_leave_idle() {
            eprintln!("skipped: cannot leave SCHED_IDLE without CAP_SYS_NICE");
            return;
        }
        let m = Arc::new(Shared::default());
        let watch = Watch::start(vec![m.clone()]).unwrap();
        let ws = watch.shared();
        let stop = Arc::new(AtomicBool::new(false));
        let (mm, st) = (m.clone(), stop.clone());
        let spinner = std::thread::spawn(move || {
            crate::vcpu::handle::pin_current_thread(0).unwrap();
            let mut p = Priority::new(SpinClass::Idle, mm, ws);
            p.spinning();
            while !st.load(Ordering::Relaxed) {
                p.beat();
                core::hint::spin_loop();
            }
            p.parking();
        });
        while m.idle_spins.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let st = stop.clone();
        let hog = std::thread::spawn(move || {
            crate::vcpu::handle::pin_current_thread(0).unwrap();
            let t = std::time::Instant::now();
            while !st.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(5) {
                core::hint::spin_loop();
            }
        });
        let t = std::time::Instant::now();
        while m.starved_boosts.load(Ordering::Relaxed) == 0 && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
        spinner.join().unwrap();
        drop(watch);
        assert_eq!(m.starved_boosts.load(Ordering::Relaxed), 1);
        assert_eq!(m.state.load(Ordering::Relaxed), RUNNING);
    }
}
