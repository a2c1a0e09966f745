//! The guest as `gdbstub` sees it: a multi-threaded x86-64 target, one gdb
//! thread per vCPU (thread id = vCPU index + 1), memory at guest-virtual
//! addresses translated through the stopped vCPU's page tables
//! (`KVM_TRANSLATE`), and breakpoints in the debug registers
//! (`KVM_GUESTDBG_USE_HW_BP`) plus an int3 in guest memory (for ring 3 on
//! `kvm_pvm`, see [`super`]), whether gdb asks for `break` or `hbreak`.
//!
//! A vCPU stopped in a forwarded ring-3 debug trap (see [`super::frame`])
//! shows gdb the ring-3 registers of its trap frame, and takes gdb's
//! register writes there; KVM's registers (the guest kernel's trap handler)
//! are left alone.
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
use super::frame::Frame;
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
    /// The int3s the stub wrote for breakpoints.
    planted: Vec<Planted>,
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
            planted: Vec::new(),
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

impl GuestTarget {
    /// gdb's registers from KVM's.
    fn kvm_to_gdb(all: &control::Regs, out: &mut X86_64CoreRegs) {
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
    }

    fn write_kvm_registers(&self, v: u32, regs: &X86_64CoreRegs) -> TargetResult<(), Self> {
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

    /// The trap frame vCPU `v` is stopped in, if it stopped in a forwarded
    /// ring-3 debug trap: its address and contents.
    fn frame(&self, v: u32) -> Result<Option<(u64, Frame)>, TargetError<ControlError>> {
        let Some(gpa) = self.control.frame(v) else {
            return Ok(None);
        };
        // Checked when the trap came; RAM does not move.
        match super::frame::read(&self.mem, gpa) {
            Some(f) => Ok(Some((gpa, f))),
            None => Err(TargetError::Errno(EFAULT)),
        }
    }

    fn put_frame(&self, gpa: u64, f: &Frame) -> TargetResult<(), Self> {
        self.mem
            .write_slice(&f.to_bytes(), GuestAddress(gpa))
            .map_err(|_| TargetError::Errno(EFAULT))
    }

    /// Before a resume: each vCPU stopped in a ring-3 trap returns from it
    /// with TF set for a step, clear for a continue, and RF when it resumes
    /// on a breakpoint.
    fn prepare_frames(&self, actions: &[Action]) {
        for (v, &a) in (0u32..).zip(actions) {
            if a == Action::Hold {
                continue;
            }
            if let Ok(Some((gpa, mut f))) = self.frame(v) {
                f.resume(a == Action::Step, self.control.has_breakpoint(f.rip()));
                if self.put_frame(gpa, &f).is_err() {
                    warn!(guest = %self.name, vcpu = v, "gdb: the trap frame at {gpa:#x} cannot be written");
                }
            }
        }
    }
}

impl MultiThreadBase for GuestTarget {
    fn read_registers(&mut self, out: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self.vcpu_or_err(tid)?;
        let all = self.control.read_regs(vcpu).map_err(|e| soft(&e))?;
        Self::kvm_to_gdb(&all, out);
        if let Some((_, f)) = self.frame(vcpu)? {
            f.to_gdb(out);
        }
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let v = self.vcpu_or_err(tid)?;
        if let Some((gpa, mut f)) = self.frame(v)? {
            f.set_from_gdb(regs);
            return self.put_frame(gpa, &f);
        }
        self.write_kvm_registers(v, regs)
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
        self.unmask(start, &mut data[..done]);
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
        self.rewrite_planted(start, data);
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
                // A step out of a ring-3 trap is the guest's own (TF).
                if self.control.frame(v).is_some() {
                    return None;
                }
                let r = self.control.read_regs(v).ok()?;
                Some((v, r.regs.rip, r.sregs.cs.selector & 3))
            });
        self.prepare_frames(&actions);
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
    // gdb's `break` (Z0) and `hbreak` (Z1) both take a debug register and
    // an int3. The register stops ring 0 (and every ring on a KVM with VMX
    // or SVM) before the int3 runs; the int3 stops ring 3 on `kvm_pvm`,
    // where debug registers do not fire in ring 3 and the guest forwards
    // its #BP (`Call::DebugTrap`). The KVM this shim runs on does not report
    // int3 to the host itself (KVM_GUESTDBG_USE_SW_BP has no effect there),
    // and without Z0 gdb would write int3 into guest memory on its own.
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl GuestTarget {
    fn set_breakpoint(&mut self, addr: u64) -> bool {
        let ok = self.control.add_breakpoint(addr);
        if ok {
            debug!(guest = %self.name, addr = format_args!("{addr:#x}"), "gdb: breakpoint set");
            self.plant(addr);
        } else {
            warn!(guest = %self.name, addr = format_args!("{addr:#x}"), "gdb: breakpoint refused: all {} debug registers are in use", control::BREAKPOINTS);
        }
        ok
    }

    fn clear_breakpoint(&mut self, addr: u64) -> bool {
        self.unplant(addr);
        self.control.remove_breakpoint(addr)
    }

    /// Writes an int3 over the byte at `gva` (translated through vCPU 0's
    /// page tables), keeping the byte. An address that does not translate
    /// keeps only its debug register.
    fn plant(&mut self, gva: u64) {
        if self.planted.iter().any(|p| p.gva == gva) {
            return;
        }
        let Ok(gpa) = self.gpa(0, gva) else {
            return;
        };
        let mut orig = [0u8];
        if self.mem.read_slice(&mut orig, GuestAddress(gpa)).is_err()
            || self.mem.write_slice(&[INT3], GuestAddress(gpa)).is_err()
        {
            return;
        }
        self.planted.push(Planted {
            gva,
            gpa,
            orig: orig[0],
        });
    }

    /// Puts back the byte under the int3 at `gva`, unless the guest has
    /// written that byte since.
    fn unplant(&mut self, gva: u64) {
        let Some(i) = self.planted.iter().position(|p| p.gva == gva) else {
            return;
        };
        let p = self.planted.swap_remove(i);
        let mut now = [0u8];
        if self.mem.read_slice(&mut now, GuestAddress(p.gpa)).is_ok() && now[0] == INT3 {
            let _ = self.mem.write_slice(&[p.orig], GuestAddress(p.gpa));
        }
    }

    /// Removes every int3 the stub planted (gdb left without removing its
    /// breakpoints).
    pub fn unplant_all(&mut self) {
        let all: Vec<u64> = self.planted.iter().map(|p| p.gva).collect();
        for gva in all {
            self.unplant(gva);
        }
    }

    /// Whether the stub has an int3 in guest memory.
    #[must_use]
    pub fn has_planted(&self) -> bool {
        !self.planted.is_empty()
    }

    /// gdb is shown the bytes under the stub's int3s (`data` was read at
    /// `start`).
    fn unmask(&self, start: u64, data: &mut [u8]) {
        for p in &self.planted {
            if let Some(b) = p
                .gva
                .checked_sub(start)
                .and_then(|o| data.get_mut(usize::try_from(o).ok()?))
            {
                *b = p.orig;
            }
        }
    }

    /// gdb wrote `data` at `start`: a byte it wrote under an int3 becomes
    /// the byte put back later, and the int3 stays.
    fn rewrite_planted(&mut self, start: u64, data: &[u8]) {
        for p in &mut self.planted {
            if let Some(&b) = p
                .gva
                .checked_sub(start)
                .and_then(|o| data.get(usize::try_from(o).ok()?))
            {
                p.orig = b;
                let _ = self.mem.write_slice(&[INT3], GuestAddress(p.gpa));
            }
        }
    }
}

/// The int3 instruction (SDM vol 2A, INT n).
const INT3: u8 = 0xCC;

/// An int3 the stub wrote over the first byte of a breakpoint's instruction.
#[derive(Clone, Copy, Debug)]
struct Planted {
    gva: u64,
    gpa: u64,
    orig: u8,
}

impl SwBreakpoint for GuestTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.set_breakpoint(addr))
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.clear_breakpoint(addr))
    }
}

impl HwBreakpoint for GuestTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.set_breakpoint(addr))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.clear_breakpoint(addr))
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
                "gdb: the single step from ring 3 at {from:#x} entered the guest's own #DB handler ({handler:#x}): this host's KVM hands ring-3 debug traps to the guest, and this guest's kernel does not forward them to the shim (no DEBUG_TRAPS support); ring-3 code cannot be stepped or break here (docs/guide.md, Debugging)"
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
                // The guest ended while gdb let it run: by its exit
                // hypercall (gdb is told the status's low byte, as a
                // process's), or stopped by the shim.
                return Ok(Event::TargetStopped(match target.control.exit_status() {
                    Some(status) => MultiThreadStopReason::Exited(status as u8),
                    None => MultiThreadStopReason::Terminated(Signal::SIGKILL),
                }));
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
