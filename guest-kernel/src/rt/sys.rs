//! Kernel-call wrappers. `int 0x80` goes through the DPL-3 gate where the CPU
//! delivers it, and arrives as #UD on this platform's KVM, where ring 0
//! recognises the CD 80 bytes and runs the same call.

use crate::abi::{Sys, SysError};

#[inline]
fn call3(n: Sys, a: u64, b: u64, c: u64) -> u64 {
    let ret: u64;
    // SAFETY: the trap path saves and restores every other register; the call
    // may read memory we pass (write), so no `nomem`.
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") n as u64 => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack));
    }
    ret
}

fn result(raw: u64) -> Result<u64, SysError> {
    SysError::from_result(raw).map_or(Ok(raw), Err)
}

/// Writes bytes to the console as one unit.
pub fn write(bytes: &[u8]) -> Result<usize, SysError> {
    result(call3(
        Sys::Write,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
        0,
    ))
    .map(|n| n as usize)
}

/// Ends the guest.
pub fn exit(status: u64) -> ! {
    call3(Sys::Exit, status, 0, 0);
    unreachable!("the exit kernel call returned");
}

/// Sleeps until an interrupt is pending on this CPU (returns at once if one is).
/// Use [`super::wait::wait_until`] rather than this directly: it closes the race
/// between checking a condition and sleeping.
pub fn halt() {
    call3(Sys::Halt, 0, 0, 0);
}

/// [`halt`], first arming this CPU's timer for TSC value `deadline` in the same
/// kernel call (one call's two exits fewer than [`set_timer`] then [`halt`]).
/// A `deadline` already passed fires the timer at once, so the call returns.
/// Use [`super::wait::wait_until_or`].
pub fn halt_until(deadline: u64) {
    call3(Sys::Halt, deadline, 0, 0);
}

/// Arms this CPU's timer for TSC value `deadline` (0 disarms).
pub fn set_timer(deadline: u64) {
    call3(Sys::SetTimer, deadline, 0, 0);
}

/// Sends `vector` to the CPU with APIC id `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) -> Result<(), SysError> {
    result(call3(
        Sys::SendIpi,
        u64::from(apic_id),
        u64::from(vector),
        0,
    ))
    .map(|_| ())
}

/// Starts application processor `cpu`; `again` sends only a further SIPI.
pub fn start_ap(cpu: usize, apic_id: u32, again: bool) -> Result<(), SysError> {
    result(call3(
        Sys::StartAp,
        cpu as u64,
        u64::from(apic_id),
        u64::from(again),
    ))
    .map(|_| ())
}

/// PCI configuration read through ports 0xCF8/0xCFC (ring 0 only does that).
pub fn pci_read(bdf: u16, offset: u8) -> Result<u32, SysError> {
    result(call3(Sys::PciRead, u64::from(bdf), u64::from(offset), 0)).map(|v| v as u32)
}

/// PCI configuration write through ports 0xCF8/0xCFC.
pub fn pci_write(bdf: u16, offset: u8, value: u32) -> Result<(), SysError> {
    result(call3(
        Sys::PciWrite,
        u64::from(bdf),
        u64::from(offset),
        u64::from(value),
    ))
    .map(|_| ())
}

/// Runs [`crate::abi::arith_loop`] in ring 0: (TSC cycles, the loop's result).
pub fn ring0_loop(iterations: u64) -> Result<(u64, u64), SysError> {
    let (ret, value): (u64, u64);
    // SAFETY: as `call`; the kernel returns the loop result in RDX.
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") Sys::Ring0Loop as u64 => ret, in("rdi") iterations, in("rsi") 0u64,
            inlateout("rdx") 0u64 => value, options(nostack, nomem));
    }
    result(ret).map(|cycles| (cycles, value))
}

/// Passes a hypercall to the Exitless shim (only calls ring 3 may make).
/// `Err(NoSys)` when not running under the shim.
pub fn hypercall(call: para_abi::hypercall::Call, arg: u64) -> Result<u64, SysError> {
    result(call3(Sys::Hypercall, u64::from(call as u32), arg, 0))
}

/// Programs this CPU's LINT0 for `ExtINT` (M3 upcalls).
pub fn upcall_lint0() -> Result<(), SysError> {
    result(call3(Sys::UpcallLint0, 0, 0, 0)).map(|_| ())
}

/// M3 tests: masked spin in ring 0 (see `Sys::UpcallMaskedSpin`). Returns
/// (TSC at `sti`, `abi::upcall_probe` bits).
/// `open`: further cycles with IF = 1 before the kernel masks again.
pub fn upcall_masked_spin(
    cycles: u64,
    mov_ss: bool,
    pings: u64,
    open: u64,
) -> Result<(u64, u64), SysError> {
    let (ret, seen): (u64, u64);
    // SAFETY: as `call3`; the kernel returns the probe bits in RDX.
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") Sys::UpcallMaskedSpin as u64 => ret, in("rdi") cycles,
            in("rsi") u64::from(mov_ss), inlateout("rdx") pings => seen, in("r10") open, options(nostack));
    }
    result(ret).map(|tsc| (tsc, seen))
}

/// CR0 (M4).
pub fn cr0_read() -> Result<u64, SysError> {
    result(call3(Sys::Cr0Read, 0, 0, 0))
}

/// Sets the CR0 bits in `mask` (MP and TS only) to those of `values` (M4);
/// returns the new CR0.
pub fn cr0_write(mask: u64, values: u64) -> Result<u64, SysError> {
    result(call3(Sys::Cr0Write, mask, values, 0))
}

/// One port access with every operand the caller's ([`Sys::PortIo`]): `size`
/// bytes (1, 2 or 4) at `port`, an `out` of `rax` when `write`, with `rbx`
/// in RBX. RAX after the access: what an `in` read (its low `size` bytes),
/// what the VMM answered a hypercall. Only for tests that attack the VMM;
/// `NoSys` unless the command line has `kernel.port_io=1`.
#[must_use]
pub fn port_io(port: u16, size: u8, write: bool, rax: u64, rbx: u64) -> u64 {
    let op = u64::from(size) | if write { crate::abi::PORT_IO_OUT } else { 0 };
    let ret: u64;
    // SAFETY: as `call`; the kernel reads R10 too.
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") Sys::PortIo as u64 => ret, in("rdi") u64::from(port),
            in("rsi") op, in("rdx") rax, in("r10") rbx, options(nostack));
    }
    ret
}

/// An undefined kernel-call number, for tests of the kernel's rejection path.
#[must_use]
pub fn raw_call(number: u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    // SAFETY: as `call`.
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") number => ret, in("rdi") a, in("rsi") b, in("rdx") 0u64, options(nostack));
    }
    ret
}
