//! Runs the tests registered with `ktest!` in ring 3, each inside a recovery
//! scope so that a fault or panic fails that test and the suite goes on; and
//! the one way a test skips, the `require*` helpers, each of which reads what
//! the host offers (or what the command line asks for).

use core::sync::atomic::Ordering;

use super::fault::{Caught, catch};
use crate::arch::BOOT;
use crate::ktest::{
    Skip, Stop, Tally, TestCase, TestResult, absence_required, display_name, offer_required,
    write_result_line,
};
use crate::linebuf::LineBuf;
use alloc::format;
use para_abi::discovery::LEAF_FEATURES;

fn offer() -> (u32, bool) {
    let under_shim = BOOT.under_shim.load(Ordering::Relaxed) != 0;
    (crate::arch::cpu::cpuid(LEAF_FEATURES, 0).eax, under_shim)
}

/// Skips the calling test unless the shim offers `feature` (a bit of
/// `para_abi::discovery::features`) in CPUID: `require(features::X)?;`.
pub fn require(feature: u32) -> TestResult {
    let (features, under_shim) = offer();
    offer_required(features, under_shim, feature)
}

/// Skips a test of `feature`'s absence where the shim offers it.
pub fn require_absent(feature: u32) -> TestResult {
    let (features, under_shim) = offer();
    absence_required(features, under_shim, feature)
}

/// Skips unless the firmware's ACPI tables describe ECAM (an MCFG).
pub fn require_ecam() -> TestResult {
    match super::start::system().pci {
        super::pci::Access::Ecam(_) => Ok(()),
        super::pci::Access::Ports => Err(Stop::Skipped(Skip::not_offered(
            "ECAM (no ACPI MCFG table)",
        ))),
    }
}

/// Skips unless the shim's para region names a spare doorbell range this
/// guest may move to (the shim's `--doorbell-redesignate`).
pub fn require_spare_doorbell_range(d: &super::doorbell::Doorbells) -> TestResult {
    if d.designation_counters().0 >= 2 {
        Ok(())
    } else {
        Err(Stop::Skipped(Skip::not_asked(
            "a spare doorbell range (host-shim --doorbell-redesignate)",
        )))
    }
}

/// Skips a benchmark unless the kernel command line asks for it with `key`.
pub fn require_asked(key: &'static str) -> TestResult {
    if super::start::system().cmdline.get(key).is_some() {
        Ok(())
    } else {
        Err(Stop::Skipped(Skip::not_asked(key)))
    }
}

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
/// line per test and the closing tally line. A filter that selects nothing
/// says so: the tally then shows nothing ran, which fails the suite.
#[must_use]
pub fn run(filter: Option<&str>) -> Tally {
    let mut tally = Tally::default();
    let selected = || {
        tests()
            .iter()
            .filter(move |t| filter.is_none_or(|f| t.name.contains(f)))
    };
    if selected().next().is_none() {
        match filter {
            Some(f) => crate::println!("ktest.filter={f} matches no test"),
            None => crate::println!("this image has no tests"),
        }
    }
    for t in selected() {
        let name = display_name(t.name);
        let result = match catch(t.run) {
            Ok(r) => r,
            Err(Caught::Fault {
                vector,
                error,
                rip,
                cr2,
            }) => Err(Stop::Failed(format!(
                "unexpected exception vector {vector} error {error:#x} at rip {rip:#x} (cr2 {cr2:#x})"
            ))),
            Err(Caught::Panic(msg)) => Err(Stop::Failed(format!("panic: {msg}"))),
        };
        // A test that faulted may have left delivery masked.
        super::irq::enable();
        tally.record(&result);
        let mut line = LineBuf::<1024>::new();
        let _ = write_result_line(&mut line, name, &result);
        let _ = super::sys::write(line.as_bytes());
    }
    crate::println!("{tally}");
    if tally.ran() == 0 {
        crate::println!(
            "ktest: no test ran ({} skipped): the suite fails",
            tally.skipped
        );
    }
    tally
}
