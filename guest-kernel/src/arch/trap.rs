//! The Rust half of the trap path: kernel calls and exceptions.

use super::entry::{TrapFrame, exitless_fault_landing};
use super::serial::{LineBuf, write};
use super::{BOOT, exit, syscall};
use crate::abi::{KSTACK_SIZE, is_user_range, status, vector};
use crate::percpu::PerCpu;
use core::fmt::Write as _;
use core::sync::atomic::Ordering;
use x86_64::registers::control::Cr2;

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// The per-CPU block of the CPU whose kernel stack we run on (see `percpu`).
/// Not valid on the IST stacks (NMI, #DF, #MC).
fn percpu_from_kstack() -> &'static PerCpu {
    let rsp: u64;
    // SAFETY: reads RSP.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nostack, nomem, preserves_flags));
    };
    let slot = (rsp | (KSTACK_SIZE as u64 - 1)) - 7;
    // SAFETY: ring-0 CPU initialisation stored this CPU's block address in the
    // top quadword of its kernel stack; the block is a `'static` in `CPUS`.
    unsafe { &*(core::ptr::read(slot as *const u64) as *const PerCpu) }
}

/// True when the two bytes at a ring-3 RIP are `int 0x80` (CD 80). On this
/// platform's KVM an `int n` at CPL 3 arrives as #UD instead.
fn is_int80_at(rip: u64) -> bool {
    if !is_user_range(rip, 2) {
        return false;
    }
    // SAFETY: the range check keeps the read inside ring 3's mapped memory.
    let bytes = unsafe { core::ptr::read_unaligned(rip as *const [u8; 2]) };
    bytes == [0xCD, 0x80]
}

#[unsafe(no_mangle)]
extern "C" fn exitless_trap(f: &mut TrapFrame) {
    if f.vector == u64::from(vector::SYSCALL) {
        syscall::dispatch(f, percpu_from_kstack());
    } else if f.vector == 6 && f.from_user() && is_int80_at(f.rip) {
        f.rip += 2;
        syscall::dispatch(f, percpu_from_kstack());
    } else if f.vector == 7 && f.from_user() && nm_to_ring3(f) {
        // Ring 3 swaps its x87 state and returns to the instruction.
    } else if matches!(f.vector, 1 | 3) && f.from_user() && to_debugger(f) {
        // The debugger had the guest stopped here; back to ring 3.
    } else {
        exception(f);
    }
}

/// #DB or #BP from ring 3 with a debugger attached to the shim: the shim
/// stops the guest here and its debugger reads and writes the ring-3
/// registers in `f`; the trap then returns to ring 3 with `f` as the
/// debugger left it. False (the trap stays fatal) without a debugger or
/// when the shim refuses.
fn to_debugger(f: &mut TrapFrame) -> bool {
    use para_abi::hypercall::{Call, Status};
    if BOOT.debug_traps.load(Ordering::Relaxed) == 0 {
        return false;
    }
    // The kernel stack is identity-mapped: its address is guest-physical.
    let frame = core::ptr::from_mut(f) as u64;
    exit::hypercall(Call::DebugTrap, frame) == Status::Ok as u64
}

unsafe extern "C" {
    /// Ring 3's #NM entry (`rt::task`).
    fn exitless_nm_landing();
}

/// #NM from ring 3 (CR0.TS set by a lazy-FPU task switch, M4): clear TS and
/// let ring 3 swap x87 state at `exitless_nm_landing`, returning to the faulting
/// instruction. A handful of instructions: ring 0 is emulated here.
fn nm_to_ring3(f: &mut TrapFrame) -> bool {
    let sp = f.rsp.wrapping_sub(8);
    if !is_user_range(sp, 8) {
        return false;
    }
    // SAFETY: clearing TS only stops #NM; the landing saves the state it guards.
    unsafe { core::arch::asm!("clts", options(nostack, nomem)) };
    // SAFETY: the range check keeps the write inside ring 3's mapped memory.
    unsafe { (sp as *mut u64).write_unaligned(f.rip) };
    f.rsp = sp;
    f.rip = exitless_nm_landing as *const () as u64;
    true
}

fn exception(f: &mut TrapFrame) {
    let v = f.vector as usize;
    let fault_addr = if v == 14 { Cr2::read_raw() } else { 0 };
    let on_ist = matches!(v, 2 | 8 | 18);
    let recover = if f.from_user() && !on_ist {
        let pc = percpu_from_kstack();
        let buf = pc.recover.load(Ordering::Acquire);
        (buf != 0).then_some(pc)
    } else {
        None
    };
    // On an IST stack the kernel-stack slot is not ours to read.
    let cpu = if on_ist {
        None
    } else {
        Some(percpu_from_kstack().cpu_id.load(Ordering::Relaxed))
    };
    let mut line = LineBuf::<256>::new();
    let _ = writeln!(
        line,
        "EXCEPTION {} (vector {}) error={:#x} rip={:#x} cr2={:#x} cs={:#x} rflags={:#x} rsp={:#x} ring={} cpu={} -> {}",
        NAMES.get(v).copied().unwrap_or("?"),
        v,
        f.error,
        f.rip,
        fault_addr,
        f.cs,
        f.rflags,
        f.rsp,
        f.cs & 3,
        cpu.map_or(-1, i64::from),
        if recover.is_some() {
            "recovered by ring 3"
        } else if v == 2 {
            "ignored"
        } else {
            "fatal"
        },
    );
    write(line.as_bytes());
    if let Some(pc) = recover {
        pc.fault.vector.store(f.vector, Ordering::Relaxed);
        pc.fault.error.store(f.error, Ordering::Relaxed);
        pc.fault.rip.store(f.rip, Ordering::Relaxed);
        pc.fault.cr2.store(fault_addr, Ordering::Relaxed);
        f.rip = exitless_fault_landing as *const () as u64;
        return;
    }
    if v == 2 {
        return;
    }
    exit::exit(status::FATAL_EXCEPTION);
}
