//! The Exitless guest kernel: a small privileged core and a user-mode data plane.
//!
//! Ring 0 (`arch`) does only what needs privilege:
//! boot, descriptor tables, the local APIC, exception and interrupt entry, AP
//! start-up and a handful of kernel calls. Everything else — memory bookkeeping,
//! ACPI and PCI discovery, interrupt handlers, the test runner, applications —
//! runs in ring 3 (`rt`). On this platform KVM emulates every ring-0 instruction
//! (about 1 µs each) while ring 3 runs natively, so ring-0 paths stay short.
//!
//! Modules that hold pure logic (`abi`, `cmdline`, `mem::frames`, `pvh`,
//! `ktest::tally`) also build for the host so `cargo test` checks them; the rest
//! exists only for `target_os = "none"`.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod abi;
pub mod backtrace;
pub mod cmdline;
pub mod ktest;
pub mod linebuf;
pub mod mem;
pub mod pvh;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod percpu;
#[cfg(target_os = "none")]
pub mod rt;

/// Defines the application the kernel runs in ring 3 on the boot CPU once the
/// platform is up. The function returns the guest's exit status (0 = success).
///
/// ```ignore
/// guest_kernel::entry!(main);
/// fn main() -> i32 { 0 }
/// ```
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        pub extern "Rust" fn exitless_app_main() -> i32 {
            $main()
        }
    };
}
