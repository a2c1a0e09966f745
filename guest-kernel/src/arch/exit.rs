//! Ending the guest: the Exitless shim's exit hypercall, or QEMU's
//! isa-debug-exit (which makes QEMU exit with `status * 2 + 1`).

use super::BOOT;
use super::cpu::outl;
use core::sync::atomic::Ordering;
use para_abi::{hypercall, layout};

/// Ends the guest with `status`. Ring 0 only.
pub fn exit(status: u64) -> ! {
    if BOOT.under_shim.load(Ordering::Relaxed) != 0 {
        // SAFETY: the shim's hypercall port; RBX carries the status. RBX is
        // reserved by the compiler, so it is swapped in and out around the `out`.
        unsafe {
            core::arch::asm!(
                "xchg rbx, {s}",
                "out dx, eax",
                "xchg rbx, {s}",
                s = inout(reg) status => _,
                in("dx") hypercall::PORT,
                in("eax") hypercall::Call::Exit as u32,
                options(nostack),
            );
        }
    }
    // SAFETY: the isa-debug-exit port; harmless where no such device exists.
    unsafe { outl(layout::QEMU_DEBUG_EXIT_PORT, status as u32) };
    loop {
        // SAFETY: nothing left to do: stop this CPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nostack, nomem)) };
    }
}
