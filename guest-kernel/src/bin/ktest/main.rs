//! The in-guest test suite: boots like any Exitless image, runs every
//! registered test in ring 3, prints one line per test and a closing
//! `N passed, M failed, K skipped` line, and exits non-zero on any failure
//! or when no test ran (a filter matching nothing, everything skipped).
//! `ktest.boot_only` runs no test and exits 0: the boot benchmark.
//! `ktest.panic` panics on purpose two calls deep, for the panic
//! backtrace's test (the `backtrace` leg of `cargo xtask test`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod ctrl;
#[cfg(target_os = "none")]
mod doorbell;
#[cfg(target_os = "none")]
mod faults;
#[cfg(target_os = "none")]
mod hints;
#[cfg(target_os = "none")]
mod interrupts;
#[cfg(target_os = "none")]
mod kcalls;
#[cfg(target_os = "none")]
mod listener;
#[cfg(target_os = "none")]
mod memory;
#[cfg(target_os = "none")]
mod net;
#[cfg(target_os = "none")]
mod notify_bench;
#[cfg(target_os = "none")]
mod pci;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod time;
#[cfg(target_os = "none")]
mod upcall;
#[cfg(target_os = "none")]
mod vmq;
#[cfg(target_os = "none")]
mod vmq_net;

#[cfg(target_os = "none")]
mod guest {
    guest_kernel::entry!(main);

    fn main() -> i32 {
        let cmdline = &guest_kernel::rt::start::system().cmdline;
        if cmdline.flag("ktest.panic") {
            return panic_on_purpose_outer(core::hint::black_box(7));
        }
        if cmdline.flag("ktest.boot_only") {
            guest_kernel::println!("ktest: boot only, no test run");
            return 0;
        }
        let filter = cmdline.get("ktest.filter");
        let tally = guest_kernel::rt::ktest_runner::run(filter);
        if tally.all_passed() {
            0
        } else {
            guest_kernel::abi::status::TESTS_FAILED as i32
        }
    }

    /// Two frames of our own above the panic, kept apart (never inlined,
    /// no tail call) so that the backtrace must name both.
    #[inline(never)]
    fn panic_on_purpose_outer(x: i32) -> i32 {
        core::hint::black_box(panic_on_purpose_inner(x)) + 1
    }

    #[inline(never)]
    fn panic_on_purpose_inner(x: i32) -> i32 {
        assert!(core::hint::black_box(x) != 7, "on purpose (ktest.panic)");
        x
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "ktest is a guest image: build it with `cargo xtask build` and boot it with `cargo xtask qemu`"
    );
    std::process::exit(2);
}
