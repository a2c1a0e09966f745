//! A cooperative task switch in ring 3 with lazy x87 state through CR0.TS (M4).
//!
//! A switch saves the callee-saved registers and the stack pointer only, then
//! sets CR0.TS with [`super::ctrl::write_flag`]. The next x87 instruction of the
//! task now running raises #NM (SDM vol 3 §2.5, §6.15 "Interrupt 7"); ring 0
//! clears TS (`clts`) and sends the task to `exitless_nm_landing`, which saves
//! the x87 state of the task that last used it (`fnsave`) and loads the current
//! task's (`frstor`), then returns to the faulting instruction. A task that never
//! touches the FPU never pays for its state.
//!
//! TS must take effect before the next task runs: a shadowed TS write would only
//! reach CR0 at the next exit. So the switch forces an exit when the write did
//! not take the owned path (docs/m4-shadow-flags.md). This Rust target is
//! soft-float: only explicit inline x87/SSE code uses the FPU (CR4.OSFXSR is
//! clear here, so that means x87).

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use para_abi::ctrl::{Flag, Rule};

use super::ctrl;
use crate::abi::MAX_CPUS;
use crate::percpu;

/// `fnsave` image: 108 bytes in 64-bit mode (SDM vol 1 §8.1.10).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct FpuArea([u8; 112]);

/// Bytes of each task's stack.
const STACK: usize = 0x4000;

/// Two contexts on one CPU: the caller of [`run_pair`] (0) and one task (1).
pub struct Pair {
    rsp: [u64; 2],
    fpu: [FpuArea; 2],
    /// Whether context i has state in `fpu[i]` worth loading.
    fpu_valid: [bool; 2],
    cur: usize,
    /// The context whose x87 state is in the registers (`usize::MAX`: unknown).
    owner: usize,
    task_done: bool,
    /// Switches and #NM faults handled, for tests and reports.
    pub switches: u64,
    pub nm_faults: u64,
}

static CURRENT: [AtomicPtr<Pair>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
/// #NM faults that reached ring 3 with no task pair running on that CPU.
pub static STRAY_NM: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    // extern "C" fn(save: *mut u64, load: u64): callee-saved registers on the
    // stack, the stack pointer into *save, then the other context's.
    // Its own section: a global_asm block without one continues whatever
    // section the block before it in the same codegen unit left open (the
    // AP trampoline's `.boot`, supervisor-only), which depends on how the
    // crate happens to be split.
    ".section .text.exitless_task_switch, \"ax\"",
    ".global exitless_task_switch",
    "exitless_task_switch:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rsp, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // A new task's first `ret` lands here: r12 = entry, r13 = argument; rsp is
    // 16-byte aligned (see `run_pair`).
    ".global exitless_task_start",
    "exitless_task_start:",
    "mov rdi, r13",
    "call r12",
    "call {finish}",
    "ud2",
    // Ring 0 sends a ring-3 #NM here with the faulting RIP pushed on the task's
    // stack and TS already clear. Everything the handler may clobber is saved;
    // the red zone is off for this target, so the pushes overwrite nothing live.
    ".global exitless_nm_landing",
    "exitless_nm_landing:",
    "pushfq",
    "push rax",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push rbx",
    "mov rbx, rsp",
    "and rsp, -16",
    "call {nm}",
    "mov rsp, rbx",
    "pop rbx",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "popfq",
    "ret",
    finish = sym task_finished,
    nm = sym nm_handler,
);

unsafe extern "C" {
    fn exitless_task_switch(save: *mut u64, load: u64);
    fn exitless_task_start();
}

fn current() -> Option<&'static mut Pair> {
    let p = CURRENT.get(percpu::cpu_id())?.load(Ordering::Acquire);
    // SAFETY: set by `run_pair` to a Pair that lives until it clears it again;
    // only this CPU's contexts use it, one at a time (cooperative).
    unsafe { p.as_mut() }
}

/// Sets CR0.TS so that the next x87 instruction faults; forces an exit when the
/// write was only shadowed, so the shim puts TS into CR0 before the next task runs.
fn arm_ts() {
    match ctrl::write_flag(Flag::Cr0Ts, true) {
        Ok(Rule::Owned | Rule::Trap) => {}
        Ok(Rule::Shadowed) => {
            let _ = ctrl::query(para_abi::ctrl::query::KVM_EXITS);
        }
        // Without TS the next task would run on the old task's registers:
        // no lazy switch is possible, stop.
        Err(e) => panic!("task switch: cannot set CR0.TS: {e}"),
    }
}

fn switch_to(p: &mut Pair, next: usize) {
    let prev = p.cur;
    p.cur = next;
    p.switches += 1;
    if lazy() {
        arm_ts();
    } else {
        eager_swap(p, prev, next);
    }
    let save = &raw mut p.rsp[prev];
    let load = p.rsp[next];
    // SAFETY: `load` is a stack pointer saved by this function (or prepared by
    // `run_pair`) for a context that is not running; `save` outlives the switch.
    unsafe { exitless_task_switch(save, load) };
}

/// 0 unknown, 1 the CPU raises #NM for CR0.TS, 2 it does not.
static TS_ENFORCED: AtomicU64 = AtomicU64::new(0);

fn lazy() -> bool {
    TS_ENFORCED.load(Ordering::Relaxed) == 1
}

/// Whether this CPU raises #NM for an x87 instruction while CR0.TS is set, as
/// [`run_pair`] found out (false before the first pair). On this host's
/// paravirtual KVM it does not: the guest's TS never reaches the hardware that
/// runs ring 3 natively, so lazy switching is impossible there.
#[must_use]
pub fn ts_enforced() -> bool {
    lazy()
}

/// Sets TS, runs one x87 instruction and sees whether #NM came (the pair must be
/// published: the handler counts into it).
fn probe_ts(p: *mut Pair) {
    if TS_ENFORCED.load(Ordering::Relaxed) != 0 {
        return;
    }
    arm_ts();
    // SAFETY: `fnop` changes no state; with TS set it raises #NM (SDM vol 3
    // §2.5), which ring 0 turns into a call of `nm_handler`.
    unsafe { core::arch::asm!("fnop", options(nostack, nomem)) };
    // SAFETY: the pair is published and nothing else holds a reference now.
    let faults = unsafe { core::mem::replace(&mut (*p).nm_faults, 0) };
    TS_ENFORCED.store(if faults > 0 { 1 } else { 2 }, Ordering::Relaxed);
    let _ = ctrl::write_flag(Flag::Cr0Ts, false);
}

/// Eager switch: save the leaving context's x87 state, load the next one's.
fn eager_swap(p: &mut Pair, prev: usize, next: usize) {
    let save = &raw mut p.fpu[prev];
    // SAFETY: TS is clear in eager mode; `save` has 108+ writable bytes.
    unsafe { core::arch::asm!("fnsave [{}]", in(reg) save, options(nostack)) };
    p.fpu_valid[prev] = true;
    if p.fpu_valid[next] {
        let load = &raw const p.fpu[next];
        // SAFETY: an image `fnsave` wrote for that context.
        unsafe { core::arch::asm!("frstor [{}]", in(reg) load, options(nostack)) };
    } else {
        // SAFETY: a clean x87 state for a context that never ran.
        unsafe { core::arch::asm!("fninit", options(nostack, nomem)) };
    }
    p.owner = next;
}

/// Gives the CPU to the other context of this CPU's pair (no-op without one).
pub fn yield_now() {
    if let Some(p) = current() {
        let next = 1 - p.cur;
        if next == 1 && p.task_done {
            return;
        }
        switch_to(p, next);
    }
}

extern "C" fn task_finished() -> ! {
    let p = current().expect("a task runs inside run_pair");
    p.task_done = true;
    switch_to(p, 0);
    unreachable!("a finished task was resumed");
}

extern "C" fn nm_handler() {
    let Some(p) = current() else {
        STRAY_NM.fetch_add(1, Ordering::Relaxed);
        return;
    };
    p.nm_faults += 1;
    // A shadowed TS: the shadow must say clear too, or the next switch's set
    // would look like no change to the shim.
    if let Ok(m) = ctrl::current_masks()
        && m.shadowed & Flag::Cr0Ts.bit() != 0
    {
        let _ = ctrl::write_flag(Flag::Cr0Ts, false);
    }
    let cur = p.cur;
    if p.owner == cur {
        return;
    }
    if p.owner < 2 {
        let area = &raw mut p.fpu[p.owner];
        // SAFETY: TS is clear (ring 0 cleared it); `area` is 108+ writable bytes.
        unsafe { core::arch::asm!("fnsave [{}]", in(reg) area, options(nostack)) };
        p.fpu_valid[p.owner] = true;
    }
    if p.fpu_valid[cur] {
        let area = &raw const p.fpu[cur];
        // SAFETY: an image `fnsave` wrote for this context.
        unsafe { core::arch::asm!("frstor [{}]", in(reg) area, options(nostack)) };
    } else {
        // SAFETY: a clean x87 state for a context that never used it.
        unsafe { core::arch::asm!("fninit", options(nostack, nomem)) };
    }
    p.owner = cur;
}

/// Runs `entry(arg)` as a second task on this CPU until it returns; each time it
/// yields, the caller runs `on_yield(n)` (n = 1, 2, ...) and switches back.
/// Returns (switches, #NM faults).
pub fn run_pair(entry: extern "C" fn(u64), arg: u64, mut on_yield: impl FnMut(u64)) -> (u64, u64) {
    let mut stack: Vec<u8> = vec![0; STACK];
    let top = (stack.as_mut_ptr() as u64 + STACK as u64) & !15;
    // After the six pops and the `ret` of the switch, rsp = top (aligned).
    let frame = top - 7 * 8;
    let words = [
        0u64,
        0,
        arg,
        entry as *const () as u64,
        0,
        0,
        exitless_task_start as *const () as u64,
    ];
    for (i, w) in words.iter().enumerate() {
        // SAFETY: inside `stack` (frame..top), 8-byte aligned.
        unsafe { ((frame + 8 * i as u64) as *mut u64).write(*w) };
    }
    let pair = Box::into_raw(Box::new(Pair {
        rsp: [0, frame],
        fpu: [FpuArea([0; 112]); 2],
        fpu_valid: [false; 2],
        cur: 0,
        // The caller's x87 registers hold its state.
        owner: 0,
        task_done: false,
        switches: 0,
        nm_faults: 0,
    }));
    let slot = &CURRENT[percpu::cpu_id()];
    slot.store(pair, Ordering::Release);
    probe_ts(pair);
    // Every access goes through `current()` while the pair is published.
    let mut yields = 0;
    while let Some(p) = current()
        && !p.task_done
    {
        switch_to(p, 1);
        if current().is_some_and(|p| !p.task_done) {
            yields += 1;
            on_yield(yields);
        }
    }
    slot.store(core::ptr::null_mut(), Ordering::Release);
    // SAFETY: from Box::into_raw above; no longer published, so no other reference.
    let pair = unsafe { Box::from_raw(pair) };
    drop(stack);
    // The caller may use the FPU again: make sure its state is in the registers.
    let r = (pair.switches, pair.nm_faults);
    if pair.owner != 0 && pair.fpu_valid[0] {
        let _ = ctrl::write_flag(Flag::Cr0Ts, false);
        let area = &raw const pair.fpu[0];
        // SAFETY: the caller's image, saved by `nm_handler`; TS is clear.
        unsafe { core::arch::asm!("frstor [{}]", in(reg) area, options(nostack)) };
    } else {
        let _ = ctrl::write_flag(Flag::Cr0Ts, false);
    }
    r
}
