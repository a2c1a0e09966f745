//! The guest as `gdbstub` sees it: a multi-threaded x86-64 target, one gdb
//! thread per vCPU (thread id = vCPU index + 1), memory at guest-virtual
//! addresses translated through the stopped vCPU's page tables
//! (`KVM_TRANSLATE`), and breakpoints in the debug registers
//! (`KVM_GUESTDBG_USE_HW_BP`), whether gdb asks for `break` or `hbreak`.
//!
//! Everything gdb asks is checked here: an address that is not mapped, or
//! that maps outside the guest's RAM, is refused with EFAULT; a thread id
//! that names no vCPU with ESRCH. Nothing gdb sends can reach host memory
//! outside the guest's.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::X86_64_SSE;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use tracing::{debug, warn};
use vm_memory::{Bytes, GuestAddress};

use super::control::{self, Action, Control, ControlError, Stop, Why};
use crate::kvm::memory::GuestMem;

const PAGE: u64 = 4096;
const EFAULT: u8 = 14;
const ESRCH: u8 = 3;
/// How often the event loop looks at the connection while the guest runs.
const POLL: Duration = Duration::from_millis(20);

/// One debugged guest, as the gdb thread holds it.
pub struct GuestTarget {
    pub name: String,
    pub control: Arc<Control>,
    pub mem: GuestMem,
    /// The resume actions gdb is putting together (vCont), one per vCPU,
    /// and whether gdb named that vCPU (the others continue, unless gdb
    /// locks the scheduler: then they stay stopped).
    actions: Vec<(Action, bool)>,
    /// The vCPU a step was asked of, and where it stood (RIP, ring).
    stepping: Option<(u32, u64, u16)>,
}

impl GuestTarget {
    #[must_use]
    pub fn new(name: &str, control: Arc<Control>, mem: GuestMem) -> Self {
        let n = control.vcpu_count() as usize;
        Self {
            name: name.to_owned(),
            control,
            mem,
            actions: vec![(Action::Continue, false); n],
            stepping: None,
        }
    }

    /// The vCPU a gdb thread id names, if any.
    fn vcpu(&self, tid: Tid) -> Option<u32> {
        let i = u32::try_from(tid.get() - 1).ok()?;
        (i < self.control.vcpu_count()).then_some(i)
    }

    fn vcpu_or_err(&self, tid: Tid) -> Result<u32, TargetError<ControlError>> {
        self.vcpu(tid).ok_or(TargetError::Errno(ESRCH))
    }

    /// The guest-physical address of `gva` through vCPU `vcpu`'s page
    /// tables, refused when unmapped or outside RAM.
    fn gpa(&self, vcpu: u32, gva: u64) -> Result<u64, TargetError<ControlError>> {
        match self.control.translate(vcpu, gva) {
            Ok(Some(gpa)) => Ok(gpa),
            Ok(None) => {
                debug!(guest = %self.name, gva = format_args!("{gva:#x}"), "gdb: address not mapped");
                Err(TargetError::Errno(EFAULT))
            }
            Err(e) => Err(soft(&e)),
        }
    }
}

/// A failed request as gdb sees it: an error reply, never the end of the session.
fn soft(e: &ControlError) -> TargetError<ControlError> {
    warn!("gdb: {e}");
    TargetError::NonFatal
}

fn tid(vcpu: u32) -> Tid {
    NonZeroUsize::new(vcpu as usize + 1).unwrap_or(NonZeroUsize::MIN)
}

impl Target for GuestTarget {
    type Arch = X86_64_SSE;
    type Error = ControlError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    // The x86-64 description gdbstub sends names the core and SSE registers
    // only; the guest's control registers are not shown.
}

impl MultiThreadBase for GuestTarget {
    fn read_registers(&mut self, out: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self.vcpu_or_err(tid)?;
        let all = self.control.read_regs(vcpu).map_err(|e| soft(&e))?;
        let g = &all.regs;
        out.regs = [
            g.rax, g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.rbp, g.rsp, g.r8, g.r9, g.r10, g.r11,
            g.r12, g.r13, g.r14, g.r15,
        ];
        out.rip = g.rip;
        // RFLAGS' upper half is reserved (zero).
        out.eflags = g.rflags as u32;
        let seg = &all.sregs;
        out.segments.cs = u32::from(seg.cs.selector);
        out.segments.ss = u32::from(seg.ss.selector);
        out.segments.ds = u32::from(seg.ds.selector);
        out.segments.es = u32::from(seg.es.selector);
        out.segments.fs = u32::from(seg.fs.selector);
        out.segments.gs = u32::from(seg.gs.selector);
        let f = &all.fpu;
        for (st, fpr) in out.st.iter_mut().zip(&f.fpr) {
            st.copy_from_slice(&fpr[..10]);
        }
        out.fpu.fctrl = u32::from(f.fcw);
        out.fpu.fstat = u32::from(f.fsw);
        out.fpu.ftag = u32::from(f.ftwx);
        out.fpu.fop = u32::from(f.last_opcode);
        out.fpu.fioff = f.last_ip as u32;
        out.fpu.fooff = f.last_dp as u32;
        for (x, b) in out.xmm.iter_mut().zip(&f.xmm) {
            *x = u128::from_le_bytes(*b);
        }
        out.mxcsr = f.mxcsr;
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let v = self.vcpu_or_err(tid)?;
        // General registers, RIP and RFLAGS are written; segment, x87 and SSE
        // values gdb sends back are not (the guest's descriptors and FPU
        // state stay as they are).
        let mut g = self.control.read_regs(v).map_err(|e| soft(&e))?.regs;
        let [
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rbp,
            rsp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
        ] = regs.regs;
        g.rax = rax;
        g.rbx = rbx;
        g.rcx = rcx;
        g.rdx = rdx;
        g.rsi = rsi;
        g.rdi = rdi;
        g.rbp = rbp;
        g.rsp = rsp;
        g.r8 = r8;
        g.r9 = r9;
        g.r10 = r10;
        g.r11 = r11;
        g.r12 = r12;
        g.r13 = r13;
        g.r14 = r14;
        g.r15 = r15;
        g.rip = regs.rip;
        // Bit 1 of RFLAGS is always set; KVM refuses a value without it.
        g.rflags = (g.rflags & !0xFFFF_FFFF) | u64::from(regs.eflags) | 2;
        self.control.write_regs(v, g).map_err(|e| soft(&e))
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let v = self.vcpu_or_err(tid)?;
        let mut done = 0usize;
        while done < data.len() {
            let gva = start.wrapping_add(done as u64);
            let n = ((PAGE - gva % PAGE) as usize).min(data.len() - done);
            let gpa = match self.gpa(v, gva) {
                Ok(p) => p,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            };
            if self
                .mem
                .read_slice(&mut data[done..done + n], GuestAddress(gpa))
                .is_err()
            {
                debug!(guest = %self.name, gpa = format_args!("{gpa:#x}"), "gdb: read outside guest RAM refused");
                if done == 0 {
                    return Err(TargetError::Errno(EFAULT));
                }
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let v = self.vcpu_or_err(tid)?;
        let mut done = 0usize;
        while done < data.len() {
            let gva = start.wrapping_add(done as u64);
            let n = ((PAGE - gva % PAGE) as usize).min(data.len() - done);
            let gpa = self.gpa(v, gva)?;
            if self
                .mem
                .write_slice(&data[done..done + n], GuestAddress(gpa))
                .is_err()
            {
                debug!(guest = %self.name, gpa = format_args!("{gpa:#x}"), "gdb: write outside guest RAM refused");
                return Err(TargetError::Errno(EFAULT));
            }
            done += n;
        }
        Ok(())
    }

    fn list_active_threads(&mut self, report: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for v in 0..self.control.vcpu_count() {
            report(tid(v));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for GuestTarget {
    fn resume(&mut self) -> Result<(), Self::Error> {
        if self.control.ended() {
            return Err(ControlError::Ended);
        }
        let actions: Vec<Action> = self.actions.iter().map(|&(a, _)| a).collect();
        self.stepping = actions
            .iter()
            .position(|&a| a == Action::Step)
            .and_then(|v| {
                let v = u32::try_from(v).ok()?;
                let r = self.control.read_regs(v).ok()?;
                Some((v, r.regs.rip, r.sregs.cs.selector & 3))
            });
        self.control.resume(&actions);
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        // gdbstub's contract: a vCPU gdb does not name continues.
        self.actions.fill((Action::Continue, false));
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        if signal.is_some() {
            debug!(guest = %self.name, "gdb: signals cannot be delivered to a vCPU; continuing without");
        }
        if let Some(v) = self.vcpu(tid) {
            self.actions[v as usize] = (Action::Continue, true);
        }
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for GuestTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        for a in &mut self.actions {
            if !a.1 {
                a.0 = Action::Hold;
            }
        }
        Ok(())
    }
}

impl MultiThreadSingleStep for GuestTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        if let Some(v) = self.vcpu(tid) {
            self.actions[v as usize] = (Action::Step, true);
        }
        Ok(())
    }
}

impl Breakpoints for GuestTarget {
    // gdb's `break` (Z0) and `hbreak` (Z1) both take a debug register: the
    // KVM this shim runs on does not report int3 to the host
    // (KVM_GUESTDBG_USE_SW_BP has no effect there; the guest takes the #BP),
    // and without Z0 gdb would write int3 into guest memory itself.
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl GuestTarget {
    fn set_breakpoint(&self, addr: u64) -> bool {
        let ok = self.control.add_breakpoint(addr);
        if ok {
            debug!(guest = %self.name, addr = format_args!("{addr:#x}"), "gdb: breakpoint set");
        } else {
            warn!(guest = %self.name, addr = format_args!("{addr:#x}"), "gdb: breakpoint refused: all {} debug registers are in use", control::BREAKPOINTS);
        }
        ok
    }
}

impl SwBreakpoint for GuestTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.set_breakpoint(addr))
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.control.remove_breakpoint(addr))
    }
}

impl HwBreakpoint for GuestTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.set_breakpoint(addr))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.control.remove_breakpoint(addr))
    }
}

impl GuestTarget {
    /// After a step: a step from ring 3 that ends in the guest's own #DB
    /// entry (IDT vector 1) means the host's KVM gave the single-step trap to
    /// the guest instead of the shim. Said once per step, in words.
    fn check_step(&self, stop: Stop) {
        let Some((vcpu, from, ring)) = self.stepping else {
            return;
        };
        if stop.why != Why::Step || stop.vcpu != vcpu || ring != 3 {
            return;
        }
        let Ok(now) = self.control.read_regs(vcpu) else {
            return;
        };
        let idt = now.sregs.idt;
        let mut gate = [0u8; 16];
        let at = idt.base.wrapping_add(16 * u64::from(control::DB_VECTOR));
        let read = self
            .gpa(vcpu, at)
            .ok()
            .map(|gpa| self.mem.read_slice(&mut gate, GuestAddress(gpa)).is_ok());
        if u64::from(idt.limit) < 31 || read != Some(true) {
            return;
        }
        // An IDT gate's handler offset: bytes 0-1, 6-7 and 8-11 (SDM vol 3 §6.14.1).
        let handler = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
            | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
            | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32;
        // KVM's trap comes once the guest's handler ran its first
        // instruction (ring-0 traps do reach the shim).
        if (handler..handler + 16).contains(&now.regs.rip) {
            warn!(
                guest = %self.name,
                vcpu,
                "gdb: the single step from ring 3 at {from:#x} entered the guest's own #DB handler ({handler:#x}): this host's KVM hands ring-3 debug traps to the guest, not to the shim; ring-3 code cannot be stepped or break here (docs/guide.md, Debugging)"
            );
        }
    }
}

/// What gdb is told about a stop.
fn reason(stop: Stop) -> MultiThreadStopReason<u64> {
    let t = tid(stop.vcpu);
    match stop.why {
        Why::Breakpoint => MultiThreadStopReason::SwBreak(t),
        Why::Step | Why::Trap => MultiThreadStopReason::SignalWithThread {
            tid: t,
            signal: Signal::SIGTRAP,
        },
        Why::Interrupt => MultiThreadStopReason::SignalWithThread {
            tid: t,
            signal: Signal::SIGINT,
        },
    }
}

/// The blocking event loop: waits for a stop while watching the connection
/// for gdb's Ctrl-C (or anything else it sends).
pub enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = GuestTarget;
    type Connection = std::net::TcpStream;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut GuestTarget,
        conn: &mut std::net::TcpStream,
    ) -> Result<
        Event<Self::StopReason>,
        WaitForStopReasonError<ControlError, <std::net::TcpStream as Connection>::Error>,
    > {
        loop {
            if let Some(stop) = target.control.wait_stop(POLL) {
                target.check_step(stop);
                return Ok(Event::TargetStopped(reason(stop)));
            }
            if target.control.ended() {
                // The guest ended on its own while gdb let it run; its
                // status is in the shim's report, not known here.
                return Ok(Event::TargetStopped(MultiThreadStopReason::Terminated(
                    Signal::SIGKILL,
                )));
            }
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut GuestTarget) -> Result<Option<Self::StopReason>, ControlError> {
        Ok(target.control.interrupt().map(reason))
    }
}
