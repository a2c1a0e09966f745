//! The panic handler, for both rings. Ring 3 reports through a kernel call and
//! may be caught by `fault::catch`; ring 0 reports on the serial port directly.
//! Either way an uncaught panic ends the guest with `status::PANIC`, after a
//! frame-pointer backtrace (`crate::backtrace`): one `backtrace: #N 0xADDR`
//! line per frame, which the host symbolises.

use crate::abi::{is_user_range, status};
use crate::arch::{exit, serial};
use crate::backtrace;
use crate::linebuf::LineBuf;
use core::fmt::Write;
use x86_64::PrivilegeLevel;
use x86_64::instructions::segmentation::{CS, Segment};

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // The current privilege level is CS's RPL (SDM vol 3 §5.5).
    if CS::get_reg().rpl() == PrivilegeLevel::Ring0 {
        let mut line = LineBuf::<512>::new();
        let _ = writeln!(line, "KERNEL PANIC (ring 0): {info}");
        serial::write(line.as_bytes());
        let mut trace = LineBuf::<1024>::new();
        // SAFETY: ring 0 reads the kernel stacks (the kernel-private
        // megabyte) and ring-3 memory, all mapped.
        unsafe {
            backtrace::write(&mut trace, backtrace::frame_pointer(), |fp| {
                (0x10_0000..0x20_0000 - 16).contains(&fp) || is_user_range(fp, 16)
            });
        }
        serial::write(trace.as_bytes());
        exit::exit(status::PANIC);
    }
    super::fault::recover_from_panic(info);
    let mut line = LineBuf::<512>::new();
    let _ = writeln!(line, "PANIC on cpu{}: {info}", crate::percpu::cpu_id());
    let _ = super::sys::write(line.as_bytes());
    let mut trace = LineBuf::<1024>::new();
    // SAFETY: ring 3 reads only ring-3 memory, all of it mapped.
    unsafe {
        backtrace::write(&mut trace, backtrace::frame_pointer(), |fp| {
            is_user_range(fp, 16)
        });
    }
    let _ = super::sys::write(trace.as_bytes());
    super::sys::exit(status::PANIC)
}
