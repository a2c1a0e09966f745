//! What the rest of the shim may see and do to one vCPU while it runs: its
//! counters, kicking it out of `KVM_RUN`, injecting an interrupt on its own
//! thread, and pinning a thread to a host CPU.
//!
//! A leaf: mechanisms, devices and the run loop all hold [`VcpuShared`].

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{kvm_interrupt, kvm_run};
use kvm_ioctls::VcpuFd;

use crate::counters::ExitCounters;
use crate::kvm::stats::KvmStats;

vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_interrupt);

/// What the rest of the shim may see and do to one vCPU while it runs.
#[derive(Debug, Default)]
pub struct VcpuShared {
    pub index: u32,
    /// The host CPU this vCPU last entered the guest on (`sched_getcpu`), or -1.
    pub host_cpu: AtomicI32,
    pub exits: ExitCounters,
    /// `KVM_INTERRUPT` injections counted for the report.
    pub injected: AtomicU64,
    thread: OnceLock<libc::pthread_t>,
    /// KVM stats read when the vCPU thread ends (name, value).
    pub kvm_final: Mutex<Vec<(&'static str, u64)>>,
    /// This vCPU's KVM binary statistics, opened at creation; any thread may read
    /// them (a stats mark sums `exits` over all vCPUs of the guest).
    pub kvm_stats: OnceLock<KvmStats>,
    /// `--vcpu-quantum`: a slice ended; yield at the next exit with the window open.
    pub yield_requested: AtomicBool,
    /// The current yield request found the window closed (counted once).
    pub yield_waiting: AtomicBool,
    /// Yields taken, and yield requests deferred because the window was closed.
    pub preempted: AtomicU64,
    pub preempt_deferred: AtomicU64,
    /// Where this vCPU's thread blocks in a mechanism's wait (M4's exitless
    /// wait); every [`Self::kick`] unparks it.
    pub park: Parker,
}

/// A thread blocked in user space on behalf of its vCPU, and what wakes it.
///
/// Wakers change the state the sleeper checks first, then call
/// [`Parker::unpark`]; the sleeper publishes that it parks before it checks
/// ([`Parker::park_until`]), so no wake-up falls between its check and its sleep.
#[derive(Debug, Default)]
pub struct Parker {
    generation: Mutex<u64>,
    cv: Condvar,
    parked: AtomicBool,
}

/// Why [`Parker::park_until`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// The condition held before the thread slept.
    Ready,
    /// Someone unparked it.
    Unparked,
    /// The deadline passed.
    Timeout,
}

impl Parker {
    /// Wakes the parked thread, if any (cheap when none is parked).
    pub fn unpark(&self) {
        if self.parked.load(Ordering::SeqCst) {
            {
                let mut g = crate::sync::lock(&self.generation);
                *g = g.wrapping_add(1);
            }
            // Notified after the lock is let go: a woken thread that runs at
            // once (same host CPU, wake-up preemption) would otherwise block
            // on the lock still held here, and cost two more switches. No
            // wake-up is lost: a parker checks the generation under the lock
            // and waits, releasing it, before this bump can be made.
            self.cv.notify_all();
        }
    }

    /// Blocks until `ready()` holds (checked once, after publishing that this
    /// thread parks), an [`Self::unpark`], or `deadline`.
    pub fn park_until(&self, deadline: Instant, ready: impl FnOnce() -> bool) -> Woken {
        self.parked.store(true, Ordering::SeqCst);
        let mut g = crate::sync::lock(&self.generation);
        let seen = *g;
        let why = if ready() {
            Woken::Ready
        } else {
            loop {
                if *g != seen {
                    break Woken::Unparked;
                }
                let now = Instant::now();
                if now >= deadline {
                    break Woken::Timeout;
                }
                g = match self.cv.wait_timeout(g, deadline - now) {
                    Ok((g, _)) => g,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
        };
        drop(g);
        self.parked.store(false, Ordering::SeqCst);
        why
    }
}

impl VcpuShared {
    #[must_use]
    pub fn new(index: u32) -> Self {
        Self {
            index,
            host_cpu: AtomicI32::new(-1),
            ..Default::default()
        }
    }

    /// Asks the vCPU to give up its host CPU at its next exit with the interrupt
    /// window open (the quantum mechanism), and kicks it so that an exit comes.
    pub fn request_yield(&self) {
        self.yield_requested.store(true, Ordering::Release);
        self.kick();
    }

    /// Makes the vCPU leave `KVM_RUN` (or not enter it) soon.
    pub fn kick(&self) {
        if let Some(&t) = self.thread.get() {
            // SAFETY: `t` is the id of this vCPU's thread, which stays joinable (the
            // owner joins it only after the last kick); the signal has a handler.
            unsafe {
                libc::pthread_kill(t, kick_signal());
            }
        }
        // After the signal: a thread parked in a wait then finds immediate_exit set.
        self.park.unpark();
    }

    /// Makes the calling thread the one [`Self::kick`] signals, and `run` (its
    /// mapped `kvm_run`) the one the kick handler stops. Call on the vCPU's
    /// thread before its first `KVM_RUN`.
    pub fn bind_current_thread(&self, run: *mut kvm_run) {
        // SAFETY: pthread_self has no preconditions.
        let _ = self.thread.set(unsafe { libc::pthread_self() });
        KVM_RUN.with(|c| c.set(run));
    }

    /// Forgets this thread's `kvm_run` before its mapping goes away.
    pub fn unbind_current_thread(&self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// The real-time signal used to kick vCPU threads.
#[must_use]
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` points at this thread's mapped kvm_run, set before the first
        // KVM_RUN and cleared before the mapping goes away; a volatile byte store is
        // async-signal-safe. immediate_exit makes the next/current KVM_RUN return EINTR.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(kvm_ioctls::Error::errno)
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// The host CPU the calling thread runs on now.
#[must_use]
pub fn current_cpu() -> i32 {
    // SAFETY: sched_getcpu has no preconditions.
    unsafe { libc::sched_getcpu() }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET only writes inside `set` (it bounds the index itself).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 = this thread.
    let rc = unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Injects `vector` with `KVM_INTERRUPT` (api.rst §4.16; with the split irqchip it is
/// accepted while the LAPIC takes `ExtINT`). Err(EEXIST) when one is still pending.
pub fn inject(fd: &VcpuFd, vector: u8) -> std::io::Result<()> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `fd` is a vCPU fd and `irq` a valid kvm_interrupt that outlives the call.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_INTERRUPT(), &irq) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
