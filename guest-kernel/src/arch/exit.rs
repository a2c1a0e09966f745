//! Ending the guest: the Exitless shim's exit hypercall, or QEMU's
//! isa-debug-exit (which makes QEMU exit with `status * 2 + 1`).

use super::BOOT;
use core::sync::atomic::Ordering;
use para_abi::{hypercall, layout};
use x86_64::instructions::port::PortWriteOnly;
use x86_64::instructions::{hlt, interrupts};

/// Issues hypercall `call` with `arg` to the Exitless shim (para_abi::hypercall);
/// returns RAX. Ring 0 only, and only under the shim.
#[inline]
#[must_use]
pub fn hypercall(call: hypercall::Call, arg: u64) -> u64 {
    let ret: u64;
    // SAFETY: the shim's hypercall port; RBX carries the argument. RBX is
    // reserved by the compiler, so it is swapped in and out around the `out`.
    unsafe {
        core::arch::asm!(
            "xchg rbx, {a}",
            "out dx, eax",
            "xchg rbx, {a}",
            a = inout(reg) arg => _,
            in("dx") hypercall::PORT,
            inlateout("rax") u64::from(call as u32) => ret,
            options(nostack),
        );
    }
    ret
}

/// Ends the guest with `status`. Ring 0 only.
pub fn exit(status: u64) -> ! {
    if BOOT.under_shim.load(Ordering::Relaxed) != 0 {
        // Does not return when the shim honours it; if it does, fall through.
        let _ = hypercall(hypercall::Call::Exit, status);
    }
    // SAFETY: the isa-debug-exit port; harmless where no such device exists.
    unsafe { PortWriteOnly::<u32>::new(layout::QEMU_DEBUG_EXIT_PORT).write(status as u32) };
    // Nothing left to do: stop this CPU.
    loop {
        interrupts::disable();
        hlt();
    }
}
