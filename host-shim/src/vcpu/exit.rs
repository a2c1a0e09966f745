//! The `KVM_RUN` loop of one vCPU: exits go to the guest's platform (ports,
//! MMIO) or, for hypercalls, to the core calls here and to the mechanism that
//! claims the call; every mechanism gets its check before each entry and its hook
//! after each exit through [`Mechanism`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use para_abi::hypercall::{CONSOLE_MAX, PORT as HYPERCALL_PORT, Status};
use tracing::{debug, error, info, warn};
use vm_memory::{Bytes, GuestAddress};

use crate::counters::{Exit, MarkReport, Marks, Reject};
use crate::hypercall::{self, Action};
use crate::kvm::memory::GuestMem;
use crate::kvm::stats::KVM_FIELDS;
use crate::mech::{CallCtx, ExitCtx, Mechanism};
use crate::platform::Platform;
use crate::sync::lock;
use crate::vcpu::handle::{VcpuShared, current_cpu, pin_current_thread};

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
    /// The shim ended the guest because another one failed (`--end-on-failure`).
    Stopped(String),
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
            Self::Stopped(why) => write!(f, "stopped: {why}"),
        }
    }
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
    /// `StatsMark` hypercalls in the order they came (bounded).
    pub marks: Marks,
    /// The mechanisms attached to the guest, in attach order; fixed before the start.
    pub mechs: Vec<Arc<dyn Mechanism>>,
    /// The guest's RAM, for calls that pass a buffer (console writes).
    pub mem: GuestMem,
}

impl GuestCtx {
    /// A running guest's shared state, before any vCPU runs.
    #[must_use]
    pub fn new(
        name: &str,
        platform: Arc<Platform>,
        vcpus: Vec<Arc<VcpuShared>>,
        mechs: Vec<Arc<dyn Mechanism>>,
        mem: GuestMem,
    ) -> Self {
        Self {
            name: name.to_owned(),
            platform,
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            vcpus,
            first_run: OnceLock::new(),
            main_reached: OnceLock::new(),
            marks: Marks::default(),
            mechs,
            mem,
        }
    }

    /// A `ConsoleWrite` hypercall: copies the bytes out of the guest's RAM
    /// (refusing, counted, a range that is not all RAM) and writes them to its
    /// console exactly as the UART would have.
    pub fn console_write(&self, gpa: u32, len: usize) -> Status {
        let mut buf = [0u8; CONSOLE_MAX];
        let buf = &mut buf[..len.min(CONSOLE_MAX)];
        match self.mem.read_slice(buf, GuestAddress(u64::from(gpa))) {
            Ok(()) => {
                self.platform.console_write(buf);
                Status::Ok
            }
            Err(e) => {
                self.platform.reject(
                    Reject::ConsoleBadBuffer,
                    format_args!("console write of {len} bytes at {gpa:#x}: {e}"),
                );
                Status::BadArgument
            }
        }
    }

    /// KVM's `exits` summed over every vCPU of the guest, now.
    #[must_use]
    pub fn kvm_exits(&self) -> u64 {
        self.kvm_sum("exits")
    }

    /// KVM statistic `name` summed over the guest's vCPUs.
    fn kvm_sum(&self, name: &str) -> u64 {
        self.vcpus
            .iter()
            .filter_map(|v| v.kvm_stats.get()?.read(name))
            .sum()
    }

    /// Records a `StatsMark`: the guest's exits and its mechanisms' counters now.
    pub fn mark(&self, label: u64) -> MarkReport {
        let mut m = MarkReport {
            label,
            exits: self.kvm_exits(),
            host_irq_exits: self.kvm_sum("irq_exits"),
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            ..MarkReport::default()
        };
        for mech in &self.mechs {
            mech.mark(&mut m);
        }
        self.marks.record(m.clone());
        m
    }

    /// Records the guest's outcome (the first one wins) and stops every vCPU.
    pub fn end(&self, outcome: Outcome) {
        {
            let mut o = lock(&self.outcome);
            if o.is_none() {
                info!(guest = %self.name, "guest ended: {outcome}");
                *o = Some(outcome);
            }
        }
        self.stop.store(true, Ordering::Release);
        let exited = match *lock(&self.outcome) {
            Some(Outcome::Exited(status)) => Some(status),
            _ => None,
        };
        for m in &self.mechs {
            if let Some(status) = exited {
                m.exited(status);
            }
            m.ending();
        }
        for v in &self.vcpus {
            v.kick();
        }
    }

    /// The mechanism that answers `call`, if the guest has it.
    fn claimant(&self, call: para_abi::hypercall::Call) -> Option<&Arc<dyn Mechanism>> {
        self.mechs.iter().find(|m| m.calls().contains(&call))
    }
}

/// Runs one vCPU until its guest stops. `pin`: the host CPU to run on, if any.
pub fn run(mut fd: VcpuFd, me: &VcpuShared, guest: &GuestCtx, pin: Option<usize>) {
    me.bind_current_thread(std::ptr::from_mut(fd.get_kvm_run()));
    if let Some(cpu) = pin
        && let Err(e) = pin_current_thread(cpu)
    {
        warn!(guest = %guest.name, vcpu = me.index, cpu, "pinning failed: {e}");
    }
    let stats = me.kvm_stats.get();

    if me.index == 0 {
        let _ = guest.first_run.set(Instant::now());
    }
    let mut window_after_exit = false;
    while !guest.stop.load(Ordering::Acquire) || defer_stop(&mut fd, me, guest) {
        // Every mechanism looks before the entry (none may be skipped: M3
        // injects here); any of them, or an exit hook, may want the window exit.
        let window = guest
            .mechs
            .iter()
            .fold(window_after_exit, |w, m| m.before_entry(&mut fd, me) | w);
        fd.get_kvm_run().request_interrupt_window = u8::from(window);
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
            // An AP's first KVM_RUN after INIT returns EAGAIN once on this KVM.
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
            let mut cx = ExitCtx {
                fd: &mut fd,
                vcpu: me,
                stopping: guest.stop.load(Ordering::Acquire),
                mechs: &guest.mechs,
            };
            window_after_exit = guest
                .mechs
                .iter()
                .fold(false, |w, m| m.after_exit(&mut cx) | w);
        }
    }

    for m in &guest.mechs {
        m.vcpu_gone(me.index);
    }
    me.unbind_current_thread();
    if let Some(s) = stats {
        let vals = KVM_FIELDS
            .iter()
            .filter_map(|&n| s.read(n).map(|v| (n, v)))
            .collect();
        *lock(&me.kvm_final) = vals;
    }
}

/// A vCPU stopped from outside (the guest did not end itself) may be kept
/// running a little by a mechanism (M3 scheduling use: not while its interrupt
/// window is closed).
fn defer_stop(fd: &mut VcpuFd, me: &VcpuShared, guest: &GuestCtx) -> bool {
    if guest.mechs.is_empty() {
        return false;
    }
    let from_outside = matches!(*lock(&guest.outcome), Some(Outcome::Interrupted));
    from_outside && guest.mechs.iter().any(|m| m.defer_stop(fd, me.index))
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
        // Only with `--gdb`: the debugger turned guest debugging on.
        VcpuExit::Debug(arch) => {
            me.exits.bump(Exit::Other);
            for m in &guest.mechs {
                m.debug_exit(me, arch.exception, arch.pc);
            }
        }
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
            resume_with(fd, me, &mut regs, Status::Ok as u64)
        }
        Action::ConsoleWrite { gpa, len } => {
            let status = guest.console_write(gpa, len);
            resume_with(fd, me, &mut regs, status as u64)
        }
        Action::MainReached { guest_us } => {
            if guest.main_reached.set((Instant::now(), guest_us)).is_ok() {
                info!(guest = %guest.name, vcpu = me.index, guest_us, "guest reached main");
            }
            resume_with(fd, me, &mut regs, Status::Ok as u64)
        }
        Action::Mechanism { call, arg } => {
            if let (Some(m), Some(v)) = (guest.claimant(call), guest.vcpus.get(me.index as usize)) {
                let cx = CallCtx {
                    fd,
                    vcpu: v,
                    platform: &guest.platform,
                    kvm_exits: &|| guest.kvm_exits(),
                };
                let rax = m.hypercall(&cx, call, arg);
                return resume_with(fd, me, &mut regs, rax);
            }
            let status = hypercall::unoffered(call);
            if hypercall::unoffered_is_counted(call) {
                guest.platform.reject(
                    Reject::UnknownHypercall,
                    format_args!(
                        "hypercall eax={:#x} rbx={arg:#x} ({call:?}: mechanism not offered)",
                        regs.rax
                    ),
                );
            }
            resume_with(fd, me, &mut regs, status as u64)
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
            resume_with(fd, me, &mut regs, status as u64)
        }
    }
}

/// Puts `rax` (a `Status`, or a mechanism's value) in RAX for the guest's
/// return from a hypercall.
fn resume_with(
    fd: &VcpuFd,
    me: &VcpuShared,
    regs: &mut kvm_bindings::kvm_regs,
    rax: u64,
) -> Option<Outcome> {
    regs.rax = rax;
    if let Err(e) = fd.set_regs(regs) {
        error!(vcpu = me.index, "KVM_SET_REGS: {e}");
        return Some(Outcome::Failed(format!("KVM_SET_REGS: {e}")));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::RejectCounters;
    use crate::devices::serial::{LineWriter, Sink, new_uart};

    #[test]
    fn console_writes_come_from_ram_only() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let uart = new_uart(LineWriter::new("g", Sink::Buffer(lines.clone())));
        let rejects = Arc::new(RejectCounters::default());
        let platform = Arc::new(Platform::new("g", uart, rejects.clone()));
        let mem = crate::kvm::memory::create("g", 4 << 20).unwrap();
        mem.write_slice(b"hello\nwor", GuestAddress(0x1000))
            .unwrap();
        let g = GuestCtx::new("g", platform, Vec::new(), Vec::new(), mem);
        assert_eq!(g.console_write(0x1000, 9), Status::Ok);
        assert_eq!(*lines.lock().unwrap(), vec!["hello".to_owned()]);
        // Beyond RAM, and straddling its end: refused and counted, nothing written.
        assert_eq!(g.console_write(0x50_0000, 4), Status::BadArgument);
        assert_eq!(g.console_write((4 << 20) - 2, 4), Status::BadArgument);
        assert_eq!(rejects.count(Reject::ConsoleBadBuffer), 2);
        assert_eq!(lines.lock().unwrap().len(), 1);
    }
}
