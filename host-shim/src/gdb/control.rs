//! Stopping and resuming a guest's vCPUs for the gdb thread.
//!
//! Only a vCPU's own thread touches its fd: while the guest is stopped each
//! vCPU thread parks in [`Control::before_entry`] and carries out the gdb
//! thread's requests (read or write registers, translate an address) there,
//! one at a time, and applies its debug flags and breakpoint registers
//! (`KVM_SET_GUEST_DEBUG`) before it enters the guest again. A vCPU that takes a debug exit stops the whole
//! guest: it records the stop and kicks every other vCPU out of `KVM_RUN`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    kvm_fpu, kvm_guest_debug, kvm_guest_debug_arch, kvm_regs, kvm_sregs,
};
use kvm_ioctls::VcpuFd;
use tracing::warn;

use crate::vcpu::handle::VcpuShared;

/// The #DB exception vector (SDM vol 3, table 6-1), as KVM reports it in a
/// debug exit.
pub const DB_VECTOR: u32 = 1;
/// The #BP exception vector (int3).
pub const BP_VECTOR: u32 = 3;
/// Instruction breakpoints the debug registers hold (DR0-DR3).
pub const BREAKPOINTS: usize = 4;

/// How long the gdb thread waits for a stopped vCPU to answer one request:
/// a vCPU thread busy in a device exit answers once it is back in its loop.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What one vCPU does at the next resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stays stopped (gdb resumed other threads only).
    Hold,
    Continue,
    /// Runs one instruction, interrupts blocked, then stops the guest.
    Step,
}

/// What becomes of a forwarded ring-3 debug trap ([`Control::debug_trap`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    /// No debugger is attached (or the guest is ending): the guest's own
    /// handling applies.
    Refused,
    /// The guest stopped here; `stepped`: the vCPU was stepping (its
    /// frame's TF is the debugger's, to be cleared); `rewind`: it hit one
    /// of the debugger's int3s, its RIP goes back onto the breakpoint.
    Stopped {
        why: Why,
        stepped: bool,
        rewind: bool,
    },
    /// The guest was already stopping for another vCPU.
    Overtaken { stepped: bool, rewind: bool },
    /// A single step the debugger did not ask for (a TF left over from an
    /// earlier step): no stop; the frame's TF is to be cleared.
    Stray,
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// A breakpoint gdb set.
    Breakpoint,
    /// A #DB the debugger cannot explain.
    Trap,
    /// A single step ended.
    Step,
    /// gdb's Ctrl-C.
    Interrupt,
}

/// The first stop since the last resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    pub vcpu: u32,
    pub why: Why,
}

/// The registers gdb sees.
#[derive(Clone, Debug, Default)]
pub struct Regs {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
}

/// A request to one stopped vCPU.
#[derive(Debug)]
enum Request {
    Read,
    Write(Box<kvm_regs>),
    Translate(u64),
}

#[derive(Debug)]
enum Reply {
    Regs(Box<Regs>),
    Written,
    /// The guest-physical address, or `None` when the page is not mapped.
    Translated(Option<u64>),
    Failed(String),
}

/// What went wrong with a request to a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("vCPU {0} does not exist")]
    NoVcpu(u32),
    #[error("the guest is running; stop it first")]
    Running,
    #[error("the guest has ended")]
    Ended,
    #[error("vCPU {0} did not answer within {ANSWER_WITHIN:?}")]
    NoAnswer(u32),
    #[error("vCPU {vcpu}: {what}")]
    Kvm { vcpu: u32, what: String },
}

#[derive(Debug, Default)]
struct Slot {
    request: Option<Request>,
    reply: Option<Reply>,
    action: Option<Action>,
    /// The debug flags and breakpoint generation this vCPU last gave KVM.
    applied: (u32, u64),
    /// Its thread left its run loop.
    gone: bool,
    /// Stopped in a forwarded ring-3 debug trap: the guest-physical address
    /// of the trap frame that holds its ring-3 registers.
    frame: Option<u64>,
    /// This resume's step runs through the frame's TF (the guest's own
    /// trap brings it back), not through KVM's single step.
    frame_step: bool,
}

#[derive(Debug)]
#[allow(clippy::struct_excessive_bools)] // gdb's view, the session and the guest's life are independent
struct State {
    /// The guest runs (false: every vCPU parks before its next entry).
    running: bool,
    /// gdb detached: the debugger lets everything run, debug flags off.
    detached: bool,
    /// The guest is ending: nothing parks any more.
    ending: bool,
    /// The status the guest ended itself with, if it did.
    exit_status: Option<u32>,
    stop: Option<Stop>,
    slots: Vec<Slot>,
    /// Breakpoint addresses (guest-virtual), one per debug register, and a
    /// count of their changes (each vCPU reloads its registers after one).
    breakpoints: [Option<u64>; BREAKPOINTS],
    breakpoints_gen: u64,
    /// Whether this KVM takes `KVM_GUESTDBG_BLOCKIRQ` (Linux 5.16+); learned
    /// at the first single step.
    block_irq: bool,
}

/// The shared stop/resume state of one debugged guest.
#[derive(Debug)]
pub struct Control {
    state: Mutex<State>,
    cv: Condvar,
    vcpus: OnceLock<Vec<Arc<VcpuShared>>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    crate::sync::lock(m)
}

impl Control {
    /// A guest of `vcpus` vCPUs that starts stopped, waiting for gdb.
    #[must_use]
    pub fn new(vcpus: u32) -> Self {
        Self {
            state: Mutex::new(State {
                running: false,
                detached: false,
                ending: false,
                exit_status: None,
                stop: None,
                slots: (0..vcpus).map(|_| Slot::default()).collect(),
                breakpoints: [None; BREAKPOINTS],
                breakpoints_gen: 0,
                block_irq: true,
            }),
            cv: Condvar::new(),
            vcpus: OnceLock::new(),
        }
    }

    /// The guest's vCPUs, once it starts (for kicks).
    pub fn set_vcpus(&self, vcpus: &[Arc<VcpuShared>]) {
        let _ = self.vcpus.set(vcpus.to_vec());
    }

    /// How many vCPUs the guest has.
    #[must_use]
    pub fn vcpu_count(&self) -> u32 {
        lock(&self.state).slots.len() as u32
    }

    fn kick_all(&self, except: Option<u32>) {
        for v in self.vcpus.get().into_iter().flatten() {
            if Some(v.index) != except {
                v.kick();
            }
        }
    }

    // ---- the vCPU threads' side ----

    /// Before each `KVM_RUN` of vCPU `index`: parks while the guest is
    /// stopped, serving the gdb thread's requests, then applies the debug
    /// flags of its resume action.
    pub fn before_entry(&self, fd: &VcpuFd, index: u32) {
        let i = index as usize;
        let mut s = lock(&self.state);
        loop {
            if s.ending || s.detached || i >= s.slots.len() {
                break;
            }
            if s.running && s.slots[i].action != Some(Action::Hold) {
                break;
            }
            if let Some(req) = s.slots[i].request.take() {
                drop(s);
                let reply = serve(fd, req);
                s = lock(&self.state);
                s.slots[i].reply = Some(reply);
                self.cv.notify_all();
                continue;
            }
            s = match self.cv.wait(s) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        let Some(slot) = s.slots.get(i) else { return };
        let mut want = if s.detached || s.ending {
            0
        } else {
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP
        };
        let step = want != 0 && slot.action == Some(Action::Step) && !slot.frame_step;
        if step {
            want |= KVM_GUESTDBG_SINGLESTEP;
            if s.block_irq {
                want |= KVM_GUESTDBG_BLOCKIRQ;
            }
        }
        let generation = s.breakpoints_gen;
        if (want, generation) == slot.applied {
            return;
        }
        let bps = s.breakpoints;
        tracing::debug!(
            vcpu = index,
            flags = format_args!("{want:#x}"),
            ?bps,
            "KVM_SET_GUEST_DEBUG"
        );
        match set_debug(fd, want, &bps) {
            Ok(()) => s.slots[i].applied = (want, generation),
            Err(e) if want & KVM_GUESTDBG_BLOCKIRQ != 0 => {
                warn!(
                    vcpu = index,
                    "KVM_SET_GUEST_DEBUG with BLOCKIRQ refused ({e}): single steps may enter interrupt handlers"
                );
                s.block_irq = false;
                want &= !KVM_GUESTDBG_BLOCKIRQ;
                match set_debug(fd, want, &bps) {
                    Ok(()) => s.slots[i].applied = (want, generation),
                    Err(e) => warn!(vcpu = index, "KVM_SET_GUEST_DEBUG: {e}"),
                }
            }
            Err(e) => warn!(vcpu = index, "KVM_SET_GUEST_DEBUG: {e}"),
        }
    }

    /// A debug exit of vCPU `index` (`exception`: the vector, `pc`: where):
    /// stops the guest unless it is already stopping.
    pub fn debug_exit(&self, index: u32, exception: u32, pc: u64) {
        let mut s = lock(&self.state);
        if s.detached || s.ending {
            return;
        }
        let stepping = s.slots.get(index as usize).and_then(|x| x.action) == Some(Action::Step);
        let why = match exception {
            DB_VECTOR if stepping => Why::Step,
            DB_VECTOR if s.breakpoints.contains(&Some(pc)) => Why::Breakpoint,
            _ => Why::Trap,
        };
        if s.running {
            s.running = false;
            s.stop = Some(Stop { vcpu: index, why });
            self.cv.notify_all();
            drop(s);
            self.kick_all(Some(index));
        }
        // Else another vCPU stopped the guest first: a breakpoint is hit
        // again after the resume (an instruction breakpoint is a fault: RIP
        // stays on it); a finished step is lost, as gdb's step on that vCPU
        // was overtaken by the other stop anyway.
    }

    /// A ring-3 debug trap the guest forwarded (`Call::DebugTrap`) on vCPU
    /// `index`: `frame` is the guest-physical address of its trap frame,
    /// `vector`, `rip` and whether RFLAGS.TF is set (`tf`) from that frame.
    /// Stops the guest there unless it is stopping already. `fix` gets
    /// (clear TF, rewind RIP by one) to apply to the frame before gdb can
    /// see the stop.
    pub fn debug_trap(
        &self,
        index: u32,
        frame: u64,
        vector: u64,
        rip: u64,
        tf: bool,
        fix: impl FnOnce(bool, bool),
    ) -> Trap {
        let mut s = lock(&self.state);
        if s.detached || s.ending {
            return Trap::Refused;
        }
        let Some(slot) = s.slots.get(index as usize) else {
            return Trap::Refused;
        };
        let stepped = slot.action == Some(Action::Step);
        // int3 traps: the saved RIP is past it (SDM vol 3 §6.15, #BP).
        let rewind =
            vector == u64::from(BP_VECTOR) && s.breakpoints.contains(&Some(rip.wrapping_sub(1)));
        let why = if vector == u64::from(DB_VECTOR) && stepped {
            Why::Step
        } else if rewind || (vector == u64::from(DB_VECTOR) && s.breakpoints.contains(&Some(rip))) {
            Why::Breakpoint
        } else if vector == u64::from(DB_VECTOR) && tf {
            // A single-step trap nobody asked for: a TF of an earlier step
            // that the guest saved with the interrupted RFLAGS when it
            // delivered an interrupt during that step (the upcall frame),
            // and restored later with `popfq`.
            fix(true, false);
            return Trap::Stray;
        } else {
            Why::Trap
        };
        fix(stepped, rewind);
        if !s.running {
            // Another vCPU stopped the guest first: a breakpoint hits again
            // after the resume (an int3 once its RIP is rewound); a step is
            // lost, as in [`Control::debug_exit`].
            return Trap::Overtaken { stepped, rewind };
        }
        s.running = false;
        s.stop = Some(Stop { vcpu: index, why });
        s.slots[index as usize].frame = Some(frame);
        self.cv.notify_all();
        drop(s);
        self.kick_all(Some(index));
        Trap::Stopped {
            why,
            stepped,
            rewind,
        }
    }

    /// vCPU `index`'s thread left its run loop.
    pub fn vcpu_gone(&self, index: u32) {
        let mut s = lock(&self.state);
        if let Some(slot) = s.slots.get_mut(index as usize) {
            slot.gone = true;
        }
        self.cv.notify_all();
    }

    /// The guest ended itself with `status` (the exit hypercall).
    pub fn exited(&self, status: u32) {
        lock(&self.state).exit_status = Some(status);
    }

    /// The guest is ending: release every parked vCPU and waiting gdb call.
    pub fn ending(&self) {
        lock(&self.state).ending = true;
        self.cv.notify_all();
    }

    // ---- the gdb thread's side ----

    /// Whether the guest has ended.
    #[must_use]
    pub fn ended(&self) -> bool {
        lock(&self.state).ending
    }

    /// The status the guest ended itself with, if it did.
    #[must_use]
    pub fn exit_status(&self) -> Option<u32> {
        lock(&self.state).exit_status
    }

    /// The trap frame vCPU `vcpu` is stopped in (guest-physical), if it
    /// stopped in a forwarded ring-3 debug trap.
    #[must_use]
    pub fn frame(&self, vcpu: u32) -> Option<u64> {
        let s = lock(&self.state);
        s.slots.get(vcpu as usize).and_then(|x| x.frame)
    }

    /// Whether a breakpoint is set at `gva`.
    #[must_use]
    pub fn has_breakpoint(&self, gva: u64) -> bool {
        lock(&self.state).breakpoints.contains(&Some(gva))
    }

    /// Resumes the guest with one action per vCPU.
    pub fn resume(&self, actions: &[Action]) {
        let mut s = lock(&self.state);
        for (slot, a) in s.slots.iter_mut().zip(actions) {
            slot.action = Some(*a);
            if *a != Action::Hold {
                // A vCPU in a ring-3 trap resumes through the guest's
                // return from it: its step is the frame's TF.
                slot.frame_step = slot.frame.take().is_some() && *a == Action::Step;
            }
        }
        s.stop = None;
        s.running = true;
        self.cv.notify_all();
    }

    /// Waits up to `within` for the guest to stop.
    pub fn wait_stop(&self, within: Duration) -> Option<Stop> {
        let deadline = Instant::now() + within;
        let mut s = lock(&self.state);
        loop {
            if let Some(stop) = s.stop.filter(|_| !s.running) {
                return Some(stop);
            }
            let now = Instant::now();
            if s.ending || now >= deadline {
                return None;
            }
            s = match self.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// gdb's Ctrl-C: stops the guest (reported on vCPU 0) unless it is
    /// stopped already.
    pub fn interrupt(&self) -> Option<Stop> {
        let mut s = lock(&self.state);
        if !s.running {
            return s.stop;
        }
        let stop = Stop {
            vcpu: 0,
            why: Why::Interrupt,
        };
        s.running = false;
        s.stop = Some(stop);
        self.cv.notify_all();
        drop(s);
        self.kick_all(None);
        Some(stop)
    }

    /// gdb left: forgets every breakpoint, turns the debug flags off and
    /// lets the guest run on its own.
    pub fn detach(&self) {
        let mut s = lock(&self.state);
        s.breakpoints = [None; BREAKPOINTS];
        s.breakpoints_gen += 1;
        s.detached = true;
        s.running = true;
        s.stop = None;
        for slot in &mut s.slots {
            slot.frame = None;
            slot.frame_step = false;
        }
        self.cv.notify_all();
    }

    fn request(&self, vcpu: u32, req: Request) -> Result<Reply, ControlError> {
        let i = vcpu as usize;
        let mut s = lock(&self.state);
        if i >= s.slots.len() {
            return Err(ControlError::NoVcpu(vcpu));
        }
        if s.running {
            return Err(ControlError::Running);
        }
        s.slots[i].reply = None;
        s.slots[i].request = Some(req);
        self.cv.notify_all();
        let deadline = Instant::now() + ANSWER_WITHIN;
        loop {
            if let Some(r) = s.slots[i].reply.take() {
                return Ok(r);
            }
            if s.ending || s.slots[i].gone {
                s.slots[i].request = None;
                return Err(ControlError::Ended);
            }
            let now = Instant::now();
            if now >= deadline {
                s.slots[i].request = None;
                return Err(ControlError::NoAnswer(vcpu));
            }
            s = match self.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// vCPU `vcpu`'s registers.
    pub fn read_regs(&self, vcpu: u32) -> Result<Regs, ControlError> {
        match self.request(vcpu, Request::Read)? {
            Reply::Regs(r) => Ok(*r),
            other => Err(unexpected(vcpu, &other)),
        }
    }

    /// Sets vCPU `vcpu`'s general registers, RIP and RFLAGS.
    pub fn write_regs(&self, vcpu: u32, regs: kvm_regs) -> Result<(), ControlError> {
        match self.request(vcpu, Request::Write(Box::new(regs)))? {
            Reply::Written => Ok(()),
            other => Err(unexpected(vcpu, &other)),
        }
    }

    /// The guest-physical address of `gva` in vCPU `vcpu`'s address space,
    /// `None` when it is not mapped.
    pub fn translate(&self, vcpu: u32, gva: u64) -> Result<Option<u64>, ControlError> {
        match self.request(vcpu, Request::Translate(gva))? {
            Reply::Translated(gpa) => Ok(gpa),
            other => Err(unexpected(vcpu, &other)),
        }
    }

    /// Sets a breakpoint at `gva`; false when all four debug registers are
    /// taken.
    pub fn add_breakpoint(&self, gva: u64) -> bool {
        let mut s = lock(&self.state);
        if s.breakpoints.contains(&Some(gva)) {
            return true;
        }
        let Some(free) = s.breakpoints.iter_mut().find(|b| b.is_none()) else {
            return false;
        };
        *free = Some(gva);
        s.breakpoints_gen += 1;
        true
    }

    /// Removes the breakpoint at `gva`; false when there was none.
    pub fn remove_breakpoint(&self, gva: u64) -> bool {
        let mut s = lock(&self.state);
        let Some(b) = s.breakpoints.iter_mut().find(|b| **b == Some(gva)) else {
            return false;
        };
        *b = None;
        s.breakpoints_gen += 1;
        true
    }
}

fn unexpected(vcpu: u32, r: &Reply) -> ControlError {
    match r {
        Reply::Failed(what) => ControlError::Kvm {
            vcpu,
            what: what.clone(),
        },
        other => ControlError::Kvm {
            vcpu,
            what: format!("unexpected answer {other:?}"),
        },
    }
}

/// Carries out one request on the vCPU's own thread.
fn serve(fd: &VcpuFd, req: Request) -> Reply {
    let failed = |what: &str, e: kvm_ioctls::Error| Reply::Failed(format!("{what}: {e}"));
    match req {
        Request::Read => {
            let regs = match fd.get_regs() {
                Ok(r) => r,
                Err(e) => return failed("KVM_GET_REGS", e),
            };
            let sregs = match fd.get_sregs() {
                Ok(r) => r,
                Err(e) => return failed("KVM_GET_SREGS", e),
            };
            let fpu = match fd.get_fpu() {
                Ok(r) => r,
                Err(e) => return failed("KVM_GET_FPU", e),
            };
            Reply::Regs(Box::new(Regs { regs, sregs, fpu }))
        }
        Request::Write(regs) => match fd.set_regs(&regs) {
            Ok(()) => Reply::Written,
            Err(e) => failed("KVM_SET_REGS", e),
        },
        Request::Translate(gva) => match fd.translate_gva(gva) {
            Ok(t) if t.valid != 0 => Reply::Translated(Some(t.physical_address)),
            Ok(_) => Reply::Translated(None),
            Err(e) => failed("KVM_TRANSLATE", e),
        },
    }
}

/// Gives KVM the debug flags and the breakpoints: DR0-DR3 hold the
/// addresses, DR7 enables each one as a local instruction breakpoint
/// (R/W and LEN 00: execution of the byte at the address; SDM vol 3 §18.2.4).
fn set_debug(
    fd: &VcpuFd,
    control: u32,
    bps: &[Option<u64>; BREAKPOINTS],
) -> Result<(), kvm_ioctls::Error> {
    let mut arch = kvm_guest_debug_arch::default();
    for (i, b) in bps.iter().enumerate() {
        if let Some(addr) = *b {
            arch.debugreg[i] = addr;
            arch.debugreg[7] |= 1 << (2 * i);
        }
    }
    let dbg = kvm_guest_debug {
        control,
        arch,
        ..Default::default()
    };
    fd.set_guest_debug(&dbg)
}

#[cfg(test)]
mod tests {
    use super::{Action, BREAKPOINTS, Control, ControlError};

    #[test]
    fn breakpoints_take_at_most_the_four_debug_registers() {
        let c = Control::new(1);
        for a in 0..BREAKPOINTS as u64 {
            assert!(c.add_breakpoint(0x1000 + a));
        }
        assert!(
            c.add_breakpoint(0x1000),
            "the same address again is no new register"
        );
        assert!(!c.add_breakpoint(0x9000), "a fifth is refused");
        assert!(c.remove_breakpoint(0x1001));
        assert!(!c.remove_breakpoint(0x1001), "removed once only");
        assert!(c.add_breakpoint(0x9000), "a freed register is reused");
    }

    #[test]
    fn requests_need_a_stopped_guest_and_an_existing_vcpu() {
        let c = Control::new(2);
        assert!(matches!(c.read_regs(2), Err(ControlError::NoVcpu(2))));
        c.resume(&[Action::Continue, Action::Continue]);
        assert!(matches!(c.read_regs(0), Err(ControlError::Running)));
        // Ctrl-C stops it and reports vCPU 0; a second one reports the same stop.
        let stop = c.interrupt().unwrap();
        assert_eq!(stop.vcpu, 0);
        assert_eq!(c.interrupt(), Some(stop));
        // A guest that ends answers no request.
        c.ending();
        assert!(matches!(c.read_regs(1), Err(ControlError::Ended)));
    }

    #[test]
    fn a_forwarded_ring3_trap_stops_the_guest_with_its_frame() {
        use super::{BP_VECTOR, DB_VECTOR, Trap, Why};
        let c = Control::new(2);
        c.add_breakpoint(0x20_1000);
        c.resume(&[Action::Continue, Action::Continue]);
        // An int3 of the debugger's: RIP is one past it, to be rewound.
        let t = c.debug_trap(1, 0x9000, u64::from(BP_VECTOR), 0x20_1001, false, |_, _| {});
        assert_eq!(
            t,
            Trap::Stopped {
                why: Why::Breakpoint,
                stepped: false,
                rewind: true
            }
        );
        assert_eq!(c.frame(1), Some(0x9000));
        assert_eq!(c.frame(0), None);
        // vCPU 0's trap while stopped: no new stop, no frame.
        let t = c.debug_trap(0, 0xa000, u64::from(BP_VECTOR), 0x20_1001, false, |_, _| {});
        assert_eq!(
            t,
            Trap::Overtaken {
                stepped: false,
                rewind: true
            }
        );
        assert_eq!(c.frame(0), None);
        // A step out of the frame is the frame's TF: reported as a step,
        // and the frame is given up at the resume.
        c.resume(&[Action::Hold, Action::Step]);
        assert_eq!(c.frame(1), None);
        let t = c.debug_trap(1, 0x9000, u64::from(DB_VECTOR), 0x20_1003, true, |_, _| {});
        assert_eq!(
            t,
            Trap::Stopped {
                why: Why::Step,
                stepped: true,
                rewind: false
            }
        );
        // An int3 that is not the debugger's is a plain SIGTRAP.
        c.resume(&[Action::Continue, Action::Continue]);
        let t = c.debug_trap(0, 0xa000, u64::from(BP_VECTOR), 0x20_5000, false, |_, _| {});
        assert!(matches!(
            t,
            Trap::Stopped {
                why: Why::Trap,
                rewind: false,
                ..
            }
        ));
        // A single-step trap on a vCPU gdb did not step (TF restored from
        // an upcall frame): no stop.
        c.resume(&[Action::Continue, Action::Continue]);
        assert_eq!(
            c.debug_trap(1, 0x9000, u64::from(DB_VECTOR), 0x20_7000, true, |_, _| {}),
            Trap::Stray
        );
        assert_eq!(c.frame(1), None);
        assert!(c.interrupt().is_some(), "the guest was still running");
        // Once gdb has gone, the guest's own handling applies.
        c.detach();
        assert_eq!(c.frame(0), None);
        assert_eq!(
            c.debug_trap(0, 0xa000, u64::from(BP_VECTOR), 0x20_1001, false, |_, _| {}),
            Trap::Refused
        );
    }

    #[test]
    fn a_debug_exit_stops_the_running_guest_once() {
        let c = Control::new(2);
        c.add_breakpoint(0x2000);
        c.resume(&[Action::Continue, Action::Step]);
        c.debug_exit(1, super::DB_VECTOR, 0x1234);
        let first = c.wait_stop(std::time::Duration::ZERO).unwrap();
        assert_eq!((first.vcpu, first.why), (1, super::Why::Step));
        // vCPU 0's breakpoint while already stopped is not a new stop.
        c.debug_exit(0, super::DB_VECTOR, 0x2000);
        assert_eq!(c.wait_stop(std::time::Duration::ZERO), Some(first));
        c.resume(&[Action::Continue, Action::Continue]);
        c.debug_exit(0, super::DB_VECTOR, 0x2000);
        let second = c.wait_stop(std::time::Duration::ZERO).unwrap();
        assert_eq!((second.vcpu, second.why), (0, super::Why::Breakpoint));
    }
}
