//! Kernel calls: the few privileged services ring 3 asks for.
//! Every argument comes from ring 3 and is checked before use.

use super::cpu::rdtsc;
use super::entry::TrapFrame;
use super::{BOOT, apic, boot, exit, serial};
use crate::abi::{MAX_CPUS, Sys, SysError, arith_loop, is_user_range, vector};
use crate::percpu::PerCpu;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use para_abi::layout::AP_TRAMPOLINE;
use x86_64::instructions::interrupts;
use x86_64::instructions::port::{Port, PortWriteOnly};
use x86_64::registers::control::{Cr0, Cr0Flags};

/// PCI configuration mechanism #1: the address and data ports (PCI Local Bus
/// 3.0 §3.2.2.3.2).
const PCI_CONFIG_ADDRESS: u16 = 0xCF8;
const PCI_CONFIG_DATA: u16 = 0xCFC;

/// The CPU index an application processor reads while it starts (one at a time).
#[unsafe(export_name = "exitless_ap_boot_cpu")]
#[unsafe(link_section = ".kdata")]
static AP_BOOT_CPU: AtomicU32 = AtomicU32::new(0);

#[unsafe(link_section = ".kdata")]
static TRAMPOLINE_READY: AtomicBool = AtomicBool::new(false);

/// Most iterations one `Ring0Loop` call may run: ring 0 is emulated here, so
/// this bounds the call to a few seconds.
pub const RING0_LOOP_MAX: u64 = 2_000_000;

pub fn dispatch(f: &mut TrapFrame, pc: &PerCpu) {
    let Some(call) = Sys::from_raw(f.rax) else {
        f.rax = SysError::NoSys as u64;
        return;
    };
    f.rax = match call {
        Sys::Write => write(f.rdi, f.rsi),
        Sys::Exit => exit::exit(f.rdi),
        Sys::Halt => halt(f.rdi, pc),
        Sys::SetTimer => set_timer(f.rdi),
        Sys::SendIpi => send_ipi(f.rdi, f.rsi),
        Sys::StartAp => start_ap(f.rdi, f.rsi, f.rdx),
        Sys::PciRead => pci_address(f.rdi, f.rsi).map_or(SysError::Invalid as u64, |a| {
            // SAFETY: configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2).
            unsafe {
                PortWriteOnly::<u32>::new(PCI_CONFIG_ADDRESS).write(a);
                u64::from(Port::<u32>::new(PCI_CONFIG_DATA).read())
            }
        }),
        Sys::PciWrite => pci_address(f.rdi, f.rsi).map_or(SysError::Invalid as u64, |a| {
            // SAFETY: as above; ring 3 owns PCI configuration in this design.
            unsafe {
                PortWriteOnly::<u32>::new(PCI_CONFIG_ADDRESS).write(a);
                Port::<u32>::new(PCI_CONFIG_DATA).write(f.rdx as u32);
            }
            0
        }),
        Sys::Hypercall => forward_hypercall(f.rdi, f.rsi),
        Sys::UpcallLint0 => {
            // SAFETY: this CPU's APIC was set up at bring-up.
            unsafe { apic::lint0_extint() };
            // Tell the shim this vCPU now takes ExtINT, so that it may post the
            // guest-wide upcall classes here. Only a guest offered upcalls gets here
            // (rt::upcall::init checks first); an older shim answers UnknownCall.
            let _ = exit::hypercall(para_abi::hypercall::Call::UpcallEnable, 0);
            0
        }
        Sys::UpcallMaskedSpin => upcall_masked_spin(f, pc),
        Sys::Cr0Read => Cr0::read_raw(),
        Sys::Cr0Write => cr0_write(f.rdi, f.rsi),
        Sys::PortIo => port_io(f.rdi, f.rsi, f.rdx, f.r10),
        Sys::Ring0Loop => {
            if f.rdi > RING0_LOOP_MAX {
                SysError::Invalid as u64
            } else {
                let t0 = rdtsc();
                f.rdx = arith_loop(f.rdi);
                rdtsc() - t0
            }
        }
    };
}

/// Forwards the hypercalls ring 3 may make; `Exit` goes through `Sys::Exit`.
fn forward_hypercall(call: u64, arg: u64) -> u64 {
    use para_abi::hypercall::Call;
    if BOOT.under_shim.load(Ordering::Relaxed) == 0 {
        return SysError::NoSys as u64;
    }
    match u32::try_from(call).ok().and_then(Call::from_raw) {
        Some(
            c @ (Call::MainReached
            | Call::StatsMark
            | Call::NotifyBench
            | Call::DoorbellRedesignate
            | Call::UpcallPing
            | Call::UpcallStorm
            | Call::CtrlWrite
            | Call::CtrlRead
            | Call::CtrlSetMasks
            | Call::CtrlQuery
            | Call::VmqFlush),
        ) => exit::hypercall(c, arg),
        _ => SysError::Invalid as u64,
    }
}

/// `Sys::PortIo`: one port access with the caller's operands, for tests
/// that attack the VMM's port handling from an application.
fn port_io(port: u64, op: u64, rax: u64, rbx: u64) -> u64 {
    use crate::abi::PORT_IO_OUT;
    if !crate::cmdline::Cmdline::new(super::bootinfo::get().cmdline()).flag("kernel.port_io") {
        return SysError::NoSys as u64;
    }
    let Ok(port) = u16::try_from(port) else {
        return SysError::Invalid as u64;
    };
    let out: u64;
    // SAFETY: the caller asked for this access on a kernel command line that
    // allows it (`kernel.port_io`); nothing of the kernel's lives behind a
    // port (the UART, PCI configuration and the hypercall port are the
    // VMM's). RBX is reserved by the compiler, so it is swapped in and out.
    unsafe {
        match op {
            1 => {
                core::arch::asm!("xchg rbx, {b}", "in al, dx", "xchg rbx, {b}", b = inout(reg) rbx => _, in("dx") port, inlateout("rax") rax => out, options(nostack));
            }
            2 => {
                core::arch::asm!("xchg rbx, {b}", "in ax, dx", "xchg rbx, {b}", b = inout(reg) rbx => _, in("dx") port, inlateout("rax") rax => out, options(nostack));
            }
            4 => {
                core::arch::asm!("xchg rbx, {b}", "in eax, dx", "xchg rbx, {b}", b = inout(reg) rbx => _, in("dx") port, inlateout("rax") rax => out, options(nostack));
            }
            o if o == PORT_IO_OUT | 1 => {
                core::arch::asm!("xchg rbx, {b}", "out dx, al", "xchg rbx, {b}", b = inout(reg) rbx => _, in("dx") port, inlateout("rax") rax => out, options(nostack));
            }
            o if o == PORT_IO_OUT | 2 => {
                core::arch::asm!("xchg rbx, {b}", "out dx, ax", "xchg rbx, {b}", b = inout(reg) rbx => _, in("dx") port, inlateout("rax") rax => out, options(nostack));
            }
            o if o == PORT_IO_OUT | 4 => {
                core::arch::asm!("xchg rbx, {b}", "out dx, eax", "xchg rbx, {b}", b = inout(reg) rbx => _, in("dx") port, inlateout("rax") rax => out, options(nostack));
            }
            _ => return SysError::Invalid as u64,
        }
    }
    out
}

/// Longest masked spin one `UpcallMaskedSpin` may ask for (TSC cycles; about a
/// second at 4 GHz): a CPU with IF = 0 takes nothing, not even its timer.
pub const MASKED_SPIN_MAX: u64 = 1 << 32;

/// `Sys::UpcallMaskedSpin`. Entered through an interrupt gate, so IF is already 0.
/// The ping hypercall exits with IF = 0: the shim must hold the upcall until the
/// `sti` below, and its interrupt must not land inside the shadow of `sti` (or of
/// the `mov ss` after it, SDM vol 3 §6.8.3). The pending bit of the upcall vector
/// is read inside the shadow and right after it.
fn upcall_masked_spin(f: &mut TrapFrame, pc: &PerCpu) -> u64 {
    use crate::abi::upcall_probe as probe;
    let (cycles, mode, pings, open) = (f.rdi, f.rsi, f.rdx, f.r10);
    if cycles > MASKED_SPIN_MAX
        || open > MASKED_SPIN_MAX
        || mode > 1
        || pings > para_abi::upcall::PING_MAX
    {
        return SysError::Invalid as u64;
    }
    let word = &pc.pending[usize::from(vector::UPCALL / 64)];
    let bit = 1u64 << (vector::UPCALL % 64);
    let mut seen = 0;
    if word.load(Ordering::Acquire) & bit != 0 {
        seen |= probe::AT_ENTRY;
    }
    if pings > 0
        && (BOOT.under_shim.load(Ordering::Relaxed) == 0
            || exit::hypercall(para_abi::hypercall::Call::UpcallPing, pings) != 0)
    {
        seen |= probe::PING_FAILED;
    }
    let deadline = rdtsc().saturating_add(cycles);
    while rdtsc() < deadline {}
    if word.load(Ordering::Acquire) & bit != 0 {
        seen |= probe::WHILE_MASKED;
    }
    let addr = word.as_ptr();
    let (sti_tsc, in_shadow, after): (u64, u64, u64);
    // SAFETY: reads of this CPU's pending word after an `sti` (the `cli` follows
    // below); RAX/RDX are clobbered by rdtsc, RCX by the selector.
    unsafe {
        if mode == 0 {
            core::arch::asm!(
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "sti",
                "mov {s}, [{a}]",
                "mov {t}, [{a}]",
                a = in(reg) addr,
                s = out(reg) in_shadow,
                t = out(reg) after,
                out("rax") sti_tsc,
                out("rdx") _,
                options(nostack),
            );
        } else {
            core::arch::asm!(
                "mov cx, ss",
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "sti",
                "mov ss, cx",
                "mov {s}, [{a}]",
                "mov {t}, [{a}]",
                a = in(reg) addr,
                s = out(reg) in_shadow,
                t = out(reg) after,
                out("rax") sti_tsc,
                out("rdx") _,
                out("rcx") _,
                options(nostack),
            );
        }
    }
    if in_shadow & bit != 0 {
        seen |= probe::IN_SHADOW;
    }
    if after & bit != 0 {
        seen |= probe::AFTER_SHADOW;
    }
    let open_until = rdtsc().saturating_add(open);
    while rdtsc() < open_until {
        if word.load(Ordering::Acquire) & bit != 0 {
            seen |= probe::LATER;
            break;
        }
    }
    // Back to IF = 0, as the trap path returns with.
    interrupts::disable();
    if seen & (probe::AFTER_SHADOW | probe::LATER) == 0 && word.load(Ordering::Acquire) & bit != 0 {
        seen |= probe::AFTER_CLI;
    }
    f.rdx = seen;
    sti_tsc
}

/// M4 owned control flags: ring 3 names only CR0.MP and CR0.TS (SDM vol 3
/// §2.5); every other CR0 bit stays the kernel's. Few instructions: ring 0 is
/// emulated here.
fn cr0_write(mask: u64, values: u64) -> u64 {
    use para_abi::ctrl::{CR0_MP, CR0_TS};
    if mask & !(CR0_MP | CR0_TS) != 0 {
        return SysError::Invalid as u64;
    }
    let cr0 = (Cr0::read_raw() & !mask) | (values & mask);
    // SAFETY: only MP/TS change: neither affects paging, protection or caching;
    // TS makes the next x87/SSE instruction raise #NM, which the caller asked for.
    unsafe { Cr0::write_raw(cr0) };
    cr0
}

// The ABI names the two CR0 bits ring 3 may own by their architectural values.
const _: () = assert!(para_abi::ctrl::CR0_MP == Cr0Flags::MONITOR_COPROCESSOR.bits());
const _: () = assert!(para_abi::ctrl::CR0_TS == Cr0Flags::TASK_SWITCHED.bits());

fn write(ptr: u64, len: u64) -> u64 {
    if len == 0 {
        // An empty slice's pointer is dangling by design; there is nothing to check.
        return 0;
    }
    if !is_user_range(ptr, len) {
        return SysError::Fault as u64;
    }
    // SAFETY: the range lies in ring 3's identity-mapped memory.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) };
    serial::write(bytes);
    len
}

/// The halt call when `entry::exitless_kcall_entry` did not run it itself
/// (a deadline with the timer in one-shot mode), with the same meaning: arm
/// the timer for `deadline` unless 0, then sleep until an interrupt is
/// pending. Entered with IF = 0 (interrupt gate): the check and `sti; hlt`
/// cannot miss a wake-up, because `sti` holds off interrupts until after the
/// next instruction (SDM vol 2B, STI).
fn halt(deadline: u64, pc: &PerCpu) -> u64 {
    if deadline != 0 {
        set_timer(deadline);
    }
    if !pc.any_pending() {
        // Waits for the next interrupt, then masks again.
        interrupts::enable_and_hlt();
        interrupts::disable();
    }
    0
}

fn set_timer(deadline: u64) -> u64 {
    if BOOT.tsc_deadline.load(Ordering::Relaxed) != 0 {
        // SAFETY: TSC-deadline mode was set up on every CPU.
        unsafe { apic::arm_deadline(deadline) };
        return 0;
    }
    let ticks = if deadline == 0 {
        0
    } else {
        let tsc_khz = BOOT.tsc_khz.load(Ordering::Relaxed).max(1);
        let lapic_khz = BOOT.lapic_khz.load(Ordering::Relaxed);
        let delta = u128::from(deadline.saturating_sub(rdtsc()));
        (delta * u128::from(lapic_khz) / u128::from(tsc_khz)).clamp(1, u128::from(u32::MAX)) as u32
    };
    // SAFETY: one-shot mode was set up on every CPU.
    unsafe { apic::arm_oneshot(ticks) };
    0
}

fn send_ipi(dest: u64, v: u64) -> u64 {
    let (Ok(dest), Ok(v)) = (u32::try_from(dest), u8::try_from(v)) else {
        return SysError::Invalid as u64;
    };
    if v < 32 || v == vector::SPURIOUS || v == vector::SYSCALL {
        return SysError::Invalid as u64;
    }
    // SAFETY: a fixed IPI with a device-range vector.
    unsafe { apic::send_ipi(dest, v) };
    0
}

fn start_ap(cpu: u64, apic_id: u64, phase: u64) -> u64 {
    let (Ok(cpu), Ok(apic_id)) = (u32::try_from(cpu), u32::try_from(apic_id)) else {
        return SysError::Invalid as u64;
    };
    if cpu == 0 || cpu as usize >= MAX_CPUS || phase > 1 {
        return SysError::Invalid as u64;
    }
    if !TRAMPOLINE_READY.swap(true, Ordering::AcqRel) {
        // SAFETY: copies the start-up code to its page below 1 MiB, which is
        // RAM reserved for it by the layout contract (para_abi::layout).
        unsafe {
            let start = core::ptr::addr_of!(boot::exitless_ap_trampoline);
            let end = core::ptr::addr_of!(boot::exitless_ap_trampoline_end);
            core::ptr::copy_nonoverlapping(
                start,
                AP_TRAMPOLINE as *mut u8,
                end as usize - start as usize,
            );
        }
    }
    AP_BOOT_CPU.store(cpu, Ordering::Release);
    // SAFETY: the trampoline is in place; AP_TRAMPOLINE is page 8.
    unsafe { apic::send_init_sipi(apic_id, (AP_TRAMPOLINE >> 12) as u8, phase == 0) };
    0
}

/// Configuration mechanism #1 address for bus/device/function `bdf`, dword `offset`.
fn pci_address(bdf: u64, offset: u64) -> Option<u32> {
    if bdf > 0xFFFF || offset > 0xFC || !offset.is_multiple_of(4) {
        return None;
    }
    Some(0x8000_0000 | ((bdf as u32) << 8) | offset as u32)
}
