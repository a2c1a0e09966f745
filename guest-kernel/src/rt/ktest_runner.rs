//! Runs the tests registered with `ktest!` in ring 3, each inside a recovery
//! scope so that a fault or panic fails that test and the suite goes on.

use super::fault::{Caught, catch};
use crate::ktest::{Tally, TestCase, display_name, write_result_line};
use crate::linebuf::LineBuf;
use alloc::format;

// Linker-script symbols: only their addresses are used, never their values
// across an FFI boundary, so the Rust layout of `TestCase` is fine.
#[allow(improper_ctypes)]
unsafe extern "C" {
    static __ktests_start: TestCase;
    static __ktests_end: TestCase;
}

fn tests() -> &'static [TestCase] {
    // SAFETY: the linker script brackets the `.ktests` section, which holds
    // only `TestCase` statics emitted by `ktest!`.
    unsafe {
        let start = core::ptr::addr_of!(__ktests_start);
        let end = core::ptr::addr_of!(__ktests_end);
        let n = (end as usize - start as usize) / core::mem::size_of::<TestCase>();
        core::slice::from_raw_parts(start, n)
    }
}

/// Runs every test whose name contains `filter` (all when `None`), prints one
/// line per test and the closing tally line.
#[must_use]
pub fn run(filter: Option<&str>) -> Tally {
    let mut tally = Tally::default();
    let selected = tests()
        .iter()
        .filter(|t| filter.is_none_or(|f| t.name.contains(f)));
    for t in selected {
        let name = display_name(t.name);
        let result = match catch(t.run) {
            Ok(r) => r,
            Err(Caught::Fault {
                vector,
                error,
                rip,
                cr2,
            }) => Err(format!(
                "unexpected exception vector {vector} error {error:#x} at rip {rip:#x} (cr2 {cr2:#x})"
            )),
            Err(Caught::Panic(msg)) => Err(format!("panic: {msg}")),
        };
        // A test that faulted may have left delivery masked.
        super::irq::enable();
        tally.record(result.is_ok());
        let mut line = LineBuf::<1024>::new();
        let _ = write_result_line(&mut line, name, &result);
        let _ = super::sys::write(line.as_bytes());
    }
    crate::println!("{tally}");
    tally
}
