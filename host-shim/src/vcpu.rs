//! vCPU threads: the `KVM_RUN` loop, exit dispatch, interrupt injection and kicks.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{kvm_interrupt, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use para_abi::hypercall::{PORT as HYPERCALL_PORT, Status};
use tracing::{debug, error, info, warn};

use crate::doorbell::GuestDoorbells;
use crate::hypercall::{self, Action};
use crate::platform::Platform;
use crate::stats::{Exit, ExitCounters, KvmStats, MarkReport, Reject};

vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_interrupt);

/// How a guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The exit hypercall, with the guest's status.
    Exited(u32),
    /// `KVM_EXIT_SHUTDOWN`: a triple fault.
    TripleFault { vcpu: u32, rip: u64 },
    /// The shim could not continue this guest (internal error, failed entry...).
    Failed(String),
    /// SIGINT/SIGTERM to the shim.
    Interrupted,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(s) => write!(f, "exit status {s}"),
            Self::TripleFault { vcpu, rip } => {
                write!(f, "triple fault on vCPU {vcpu} at rip {rip:#x}")
            }
            Self::Failed(why) => write!(f, "failed: {why}"),
            Self::Interrupted => write!(f, "interrupted"),
        }
    }
}

/// What the rest of the shim may see and do to one vCPU while it runs.
#[derive(Debug, Default)]
pub struct VcpuShared {
    pub index: u32,
    /// The host CPU this vCPU last entered the guest on (`sched_getcpu`), or -1.
    pub host_cpu: AtomicI32,
    pub exits: ExitCounters,
    pub injected: AtomicU64,
    pending: Mutex<VecDeque<u8>>,
    has_pending: AtomicBool,
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

    /// Queues an external interrupt for this vCPU and kicks it so that it is
    /// injected as soon as the guest can take it (DESIGN §3, M3).
    pub fn queue_interrupt(&self, vector: u8) {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(vector);
        self.has_pending.store(true, Ordering::Release);
        self.kick();
    }

    /// Asks the vCPU to give up its host CPU at its next exit with the interrupt
    /// window open (`crate::quantum`), and kicks it so that an exit comes.
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

/// Work the shim does for a vCPU at each of its exits, whatever the cause: M4
/// applies shadowed control flags there, M5 delivers lazily sent messages there.
/// Runs on the vCPU's own thread, between `KVM_RUN`s, so it may use `fd`.
pub trait ExitHook: Send + Sync {
    fn after_exit(&self, fd: &VcpuFd, vcpu: &VcpuShared, guest: &GuestCtx);
}

/// What a vCPU thread needs from its guest.
pub struct GuestCtx {
    pub name: String,
    pub platform: Arc<Platform>,
    pub stop: AtomicBool,
    pub outcome: Mutex<Option<Outcome>>,
    pub vcpus: Vec<Arc<VcpuShared>>,
    /// When the boot vCPU first entered `KVM_RUN`.
    pub first_run: OnceLock<Instant>,
    /// The first `MainReached` hypercall: when the shim saw it, and the guest's own
    /// µs since PVH entry (RBX).
    pub main_reached: OnceLock<(Instant, u64)>,
    /// The guest's doorbell side (M1), when the shim offers doorbells.
    pub doorbells: OnceLock<Arc<GuestDoorbells>>,
    /// `StatsMark` hypercalls in the order they came.
    pub marks: Mutex<Vec<MarkReport>>,
    /// Run after every exit of every vCPU ([`ExitHook`]); fixed before the start.
    pub exit_hooks: Vec<Arc<dyn ExitHook>>,
    /// M3 upcalls (the pending event module), when the shim offers them.
    pub upcalls: OnceLock<Arc<crate::pending::GuestUpcalls>>,
    /// The guest's control blocks (M4), when the shim offers shadowed flags.
    pub ctrl: OnceLock<Arc<crate::ctrl::GuestCtrl>>,
}

impl GuestCtx {
    /// A running guest's shared state, before any vCPU runs.
    #[must_use]
    pub fn new(name: &str, platform: Arc<Platform>, vcpus: Vec<Arc<VcpuShared>>) -> Self {
        Self {
            name: name.to_owned(),
            platform,
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            vcpus,
            first_run: OnceLock::new(),
            main_reached: OnceLock::new(),
            doorbells: OnceLock::new(),
            marks: Mutex::new(Vec::new()),
            exit_hooks: Vec::new(),
            upcalls: OnceLock::new(),
            ctrl: OnceLock::new(),
        }
    }

    /// Posts one upcall of `class` to vCPU `vcpu` (M3): it is injected when that
    /// vCPU's interrupt window is open, exactly once. False when the guest has no
    /// upcalls offered or no such vCPU.
    pub fn post_upcall(&self, vcpu: u32, class: crate::pending::UpcallClass) -> bool {
        let (Some(u), Some(v)) = (self.upcalls.get(), self.vcpus.get(vcpu as usize)) else {
            return false;
        };
        u.post(vcpu, class, 1, || v.kick())
    }

    /// KVM's `exits` summed over every vCPU of the guest, now.
    #[must_use]
    pub fn kvm_exits(&self) -> u64 {
        self.vcpus
            .iter()
            .filter_map(|v| v.kvm_stats.get()?.read("exits"))
            .sum()
    }

    /// Records a `StatsMark`: the guest's exits and doorbell counters now.
    pub fn mark(&self, label: u64) -> MarkReport {
        let exits = self.kvm_exits();
        let db = self
            .doorbells
            .get()
            .map(|d| d.snapshot())
            .unwrap_or_default();
        let m = MarkReport {
            label,
            exits,
            doorbell_events: db.events,
            sink_events: db.sink_events,
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        self.marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(m.clone());
        m
    }

    /// Records the guest's outcome (the first one wins) and stops every vCPU.
    pub fn end(&self, outcome: Outcome) {
        {
            let mut o = self
                .outcome
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if o.is_none() {
                info!(guest = %self.name, "guest ended: {outcome}");
                *o = Some(outcome);
            }
        }
        self.stop.store(true, Ordering::Release);
        if let Some(u) = self.upcalls.get() {
            u.close();
        }
        for v in &self.vcpus {
            v.kick();
        }
    }
}

fn current_cpu() -> i32 {
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
pub(crate) fn inject(fd: &VcpuFd, vector: u8) -> std::io::Result<()> {
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

/// Injects a pending interrupt when the guest can take one, else asks KVM for an
/// interrupt-window exit (`KVM_EXIT_IRQ_WINDOW_OPEN`).
fn service_pending(fd: &mut VcpuFd, me: &VcpuShared, guest: &GuestCtx) {
    let injected_before = me.injected.load(Ordering::Relaxed);
    service_queue(fd, me);
    if let Some(u) = guest.upcalls.get() {
        // KVM holds one injected interrupt at a time: the plain queue goes first.
        let busy = me.has_pending.load(Ordering::Acquire)
            || me.injected.load(Ordering::Relaxed) != injected_before;
        if u.service(fd, me.index, busy) {
            fd.get_kvm_run().request_interrupt_window = 1;
        }
    }
}

fn service_queue(fd: &mut VcpuFd, me: &VcpuShared) {
    if !me.has_pending.load(Ordering::Acquire) {
        fd.get_kvm_run().request_interrupt_window = 0;
        return;
    }
    let run = fd.get_kvm_run();
    let ready = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
    let mut q = me
        .pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if ready && let Some(&v) = q.front() {
        match inject(fd, v) {
            Ok(()) => {
                q.pop_front();
                me.injected.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => debug!(vector = v, "KVM_INTERRUPT deferred: {e}"),
        }
    }
    let more = !q.is_empty();
    me.has_pending.store(more, Ordering::Release);
    fd.get_kvm_run().request_interrupt_window = u8::from(more);
}

/// Runs one vCPU until its guest stops. `pin`: the host CPU to run on, if any.
pub fn run(mut fd: VcpuFd, me: &VcpuShared, guest: &GuestCtx, pin: Option<usize>) {
    // SAFETY: pthread_self has no preconditions.
    let _ = me.thread.set(unsafe { libc::pthread_self() });
    if let Some(cpu) = pin
        && let Err(e) = pin_current_thread(cpu)
    {
        warn!(guest = %guest.name, vcpu = me.index, cpu, "pinning failed: {e}");
    }
    let stats = me.kvm_stats.get();
    KVM_RUN.with(|c| c.set(std::ptr::from_mut(fd.get_kvm_run())));

    if me.index == 0 {
        let _ = guest.first_run.set(Instant::now());
    }
    let mut yield_wait = false;
    while !guest.stop.load(Ordering::Acquire) || defer_stop(&mut fd, me, guest) {
        service_pending(&mut fd, me, guest);
        if yield_wait {
            fd.get_kvm_run().request_interrupt_window = 1;
        }
        me.host_cpu.store(current_cpu(), Ordering::Relaxed);
        let exited = match fd.run() {
            Ok(exit) => {
                if let Some(end) = handle_exit(exit, me, guest) {
                    let end = match end {
                        Pending::Hypercall(size) => hypercall_exit(&fd, me, guest, size),
                        Pending::Fatal(o) => Some(o_with_rip(o, &fd, me.index)),
                    };
                    if let Some(o) = end {
                        guest.end(o);
                    }
                }
                true
            }
            Err(e) if e.errno() == libc::EINTR => {
                me.exits.bump(Exit::Intr);
                fd.set_kvm_immediate_exit(0);
                true
            }
            // An AP's first KVM_RUN after INIT returns EAGAIN once (DESIGN §7).
            Err(e) if e.errno() == libc::EAGAIN => {
                me.exits.bump(Exit::Eagain);
                false
            }
            Err(e) => {
                guest.end(Outcome::Failed(format!(
                    "KVM_RUN on vCPU {}: {e}",
                    me.index
                )));
                false
            }
        };
        if exited {
            for h in &guest.exit_hooks {
                h.after_exit(&fd, me, guest);
            }
            yield_wait = crate::quantum::at_exit(&mut fd, me, guest);
        }
    }

    if let Some(u) = guest.upcalls.get() {
        u.vcpu_gone(me.index);
    }
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    if let Some(s) = stats {
        let vals = crate::stats::KVM_FIELDS
            .iter()
            .filter_map(|&n| s.read(n).map(|v| (n, v)))
            .collect();
        *me.kvm_final
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = vals;
    }
}

/// M3 scheduling use: a vCPU stopped from outside (the guest did not end
/// itself) is not stopped while its interrupt window is closed.
fn defer_stop(fd: &mut VcpuFd, me: &VcpuShared, guest: &GuestCtx) -> bool {
    let Some(u) = guest.upcalls.get() else {
        return false;
    };
    let from_outside = matches!(
        *guest
            .outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        Some(Outcome::Interrupted)
    );
    from_outside && u.defer_stop(fd, me.index)
}

/// Exits that need the vCPU fd after the exit's borrow of it ends.
enum Pending {
    Hypercall(usize),
    Fatal(Outcome),
}

fn o_with_rip(o: Outcome, fd: &VcpuFd, vcpu: u32) -> Outcome {
    let rip = fd.get_regs().map_or(u64::MAX, |r| r.rip);
    match o {
        Outcome::TripleFault { .. } => Outcome::TripleFault { vcpu, rip },
        Outcome::Failed(why) => Outcome::Failed(format!("{why} (vCPU {vcpu}, rip {rip:#x})")),
        other => other,
    }
}

fn handle_exit(exit: VcpuExit<'_>, me: &VcpuShared, guest: &GuestCtx) -> Option<Pending> {
    let p = &guest.platform;
    match exit {
        VcpuExit::IoOut(port, data) => {
            me.exits.bump(Exit::IoOut);
            if port == HYPERCALL_PORT {
                me.exits.bump(Exit::Hypercall);
                return Some(Pending::Hypercall(data.len()));
            }
            p.pio_write(port, data);
        }
        VcpuExit::IoIn(port, data) => {
            me.exits.bump(Exit::IoIn);
            p.pio_read(port, data);
        }
        VcpuExit::MmioRead(addr, data) => {
            me.exits.bump(Exit::MmioRead);
            p.mmio_read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            me.exits.bump(Exit::MmioWrite);
            p.mmio_write(addr, data);
        }
        VcpuExit::IrqWindowOpen => me.exits.bump(Exit::IrqWindow),
        VcpuExit::Hlt => me.exits.bump(Exit::Hlt),
        VcpuExit::Shutdown => {
            me.exits.bump(Exit::Shutdown);
            return Some(Pending::Fatal(Outcome::TripleFault {
                vcpu: me.index,
                rip: 0,
            }));
        }
        VcpuExit::SystemEvent(kind, _) => {
            me.exits.bump(Exit::SystemEvent);
            return Some(Pending::Fatal(Outcome::Failed(format!(
                "system event {kind}"
            ))));
        }
        VcpuExit::InternalError => {
            me.exits.bump(Exit::InternalError);
            return Some(Pending::Fatal(Outcome::Failed(
                "KVM internal error (emulation failure)".into(),
            )));
        }
        VcpuExit::FailEntry(reason, cpu) => {
            me.exits.bump(Exit::Other);
            return Some(Pending::Fatal(Outcome::Failed(format!(
                "entry failed: reason {reason:#x} on cpu {cpu}"
            ))));
        }
        other => {
            me.exits.bump(Exit::Other);
            return Some(Pending::Fatal(Outcome::Failed(format!(
                "unexpected exit {other:?}"
            ))));
        }
    }
    None
}

fn hypercall_exit(fd: &VcpuFd, me: &VcpuShared, guest: &GuestCtx, size: usize) -> Option<Outcome> {
    let mut regs = match fd.get_regs() {
        Ok(r) => r,
        Err(e) => {
            return Some(Outcome::Failed(format!(
                "KVM_GET_REGS on vCPU {}: {e}",
                me.index
            )));
        }
    };
    match hypercall::decode(size, regs.rax, regs.rbx) {
        Action::Exit(status) => Some(Outcome::Exited(status)),
        Action::StatsMark { label } => {
            let m = guest.mark(label);
            debug!(guest = %guest.name, label, exits = m.exits, sink = m.sink_events, "stats mark");
            resume_with(fd, me, &mut regs, Status::Ok)
        }
        Action::NotifyBench { mailbox } => {
            let status = guest
                .doorbells
                .get()
                .and_then(|d| d.bench.get())
                .map_or(Status::UnknownCall, |b| b.setup(fd, mailbox));
            if status != Status::Ok {
                guest.platform.reject(
                    Reject::UnknownHypercall,
                    format_args!("notify bench set-up at {mailbox:#x} -> {status:?}"),
                );
            }
            resume_with(fd, me, &mut regs, status)
        }
        Action::DoorbellRedesignate => {
            let status = guest
                .doorbells
                .get()
                .and_then(|d| d.redesignation.get())
                .map_or(Status::UnknownCall, |r| {
                    r.swap(&guest.name, || {
                        guest.upcalls.get().is_some_and(|u| {
                            u.post_to_guest(None, crate::pending::UpcallClass::Redesignation)
                                .is_some()
                        })
                    })
                });
            resume_with(fd, me, &mut regs, status)
        }
        Action::MainReached { guest_us } => {
            if guest.main_reached.set((Instant::now(), guest_us)).is_ok() {
                info!(guest = %guest.name, vcpu = me.index, guest_us, "guest reached main");
            }
            resume_with(fd, me, &mut regs, Status::Ok)
        }
        Action::Upcall { call, arg } => {
            let status = match (guest.upcalls.get(), guest.vcpus.get(me.index as usize)) {
                (Some(u), Some(v)) => u.hypercall(call, arg, me.index, v.clone()),
                _ => Status::UnknownCall,
            };
            resume_with(fd, me, &mut regs, status)
        }
        Action::Ctrl { call, arg } if let Some(c) = guest.ctrl.get() => {
            regs.rax = c.hypercall(fd, me, guest, call, arg);
            fd.set_regs(&regs)
                .err()
                .map(|e| Outcome::Failed(format!("KVM_SET_REGS: {e}")))
        }
        // M4 not offered to this guest: an unknown call like any other.
        Action::Ctrl { .. } => {
            guest.platform.reject(
                Reject::UnknownHypercall,
                format_args!("hypercall eax={:#x} (M4 not offered)", regs.rax),
            );
            resume_with(fd, me, &mut regs, Status::UnknownCall)
        }
        Action::Return(status) => {
            if status != Status::Ok {
                guest.platform.reject(
                    Reject::UnknownHypercall,
                    format_args!(
                        "hypercall eax={:#x} rbx={:#x} size {size} -> {status:?}",
                        regs.rax, regs.rbx
                    ),
                );
            }
            resume_with(fd, me, &mut regs, status)
        }
    }
}

/// Puts `status` in RAX for the guest's return from a hypercall.
fn resume_with(
    fd: &VcpuFd,
    me: &VcpuShared,
    regs: &mut kvm_bindings::kvm_regs,
    status: Status,
) -> Option<Outcome> {
    regs.rax = status as u64;
    if let Err(e) = fd.set_regs(regs) {
        error!(vcpu = me.index, "KVM_SET_REGS: {e}");
        return Some(Outcome::Failed(format!("KVM_SET_REGS: {e}")));
    }
    None
}
