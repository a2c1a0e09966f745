//! Ring-3 bring-up on the boot CPU: memory, logging, ACPI, SMP, PCI, then the
//! application. Ring 0 has only loaded tables and calibrated the TSC by now.

use super::platform::{self, Platform};
use super::{console, irq, pci, smp, sys, time};
use crate::abi::{status, vector};
use crate::arch::{BOOT, cpu::rdtsc, time::Source};
use crate::cmdline::Cmdline;
use crate::mem::heap;
use core::sync::atomic::Ordering;

unsafe extern "C" {
    static __image_end: u8;
}

unsafe extern "Rust" {
    /// Defined by the image through [`crate::entry!`].
    fn exitless_app_main() -> i32;
}

/// What bring-up found, for applications.
#[derive(Debug)]
pub struct System {
    pub cmdline: Cmdline<'static>,
    pub platform: Platform,
    pub pci: pci::Access,
    pub memory: heap::MemoryInfo,
}

static SYSTEM: spin::Once<System> = spin::Once::new();

/// The system description; available once the application runs.
#[must_use]
pub fn system() -> &'static System {
    SYSTEM
        .get()
        .expect("rt::start::system() called before bring-up finished")
}

fn die(msg: &str) -> ! {
    crate::println!("boot failed: {msg}");
    sys::exit(status::PANIC)
}

fn noop(_: u8) {}

fn apic_error(_: u8) {
    log::warn!("local APIC error interrupt");
}

#[unsafe(no_mangle)]
extern "C" fn exitless_user_bsp() -> ! {
    let blob = crate::arch::bootinfo::get();
    let si = blob.start_info;
    if let Err(e) = si.validate() {
        die(match e {
            crate::pvh::StartInfoError::BadMagic(_) => "hvm_start_info has a bad magic number",
            crate::pvh::StartInfoError::NoMemmap => "hvm_start_info has no memory map (version 0?)",
        });
    }
    let memmap = blob.memmap();
    let cmdline = Cmdline::new(blob.cmdline());
    console::init(cmdline.get("loglevel"));

    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let memory = heap::init(memmap, image_end, cmdline.size("heap")).unwrap_or_else(|e| die(e));

    irq::register(vector::TIMER, noop);
    irq::register(vector::WAKE, noop);
    irq::register(vector::APIC_ERROR, apic_error);
    irq::enable();

    let platform = platform::discover(si.rsdp_paddr).unwrap_or_else(|e| {
        crate::println!("boot failed: {e}");
        sys::exit(status::PANIC)
    });
    // M3: the shim's upcalls (re-designations, hint updates...) on every
    // CPU: this one's set up while the others start.
    let mut upcalls = Ok(());
    let t_aps = rdtsc();
    let cpus = smp::start_aps(&platform.cpus, || upcalls = super::upcall::bring_up());
    let aps_us = rdtsc().saturating_sub(t_aps) * 1000 / time::tsc_khz();
    let upcalls = match upcalls {
        Ok(()) => alloc::format!("upcalls taken on {} of them", super::upcall::taking()),
        Err(e) => alloc::format!("{e}"),
    };
    let pci = platform.ecam.map_or(pci::Access::Ports, pci::Access::Ecam);

    let khz = time::tsc_khz();
    let us = |from: u64, to: u64| to.saturating_sub(from) * 1000 / khz;
    let entry = BOOT.tsc_at_entry.load(Ordering::Relaxed);
    // Few lines: under the shim each costs a kernel call and an exit.
    log::info!(
        "exitless: {} CPU(s) online of {} described after {aps_us} us, {upcalls}; {} MiB usable RAM, heap {} MiB, {} free frames",
        cpus,
        platform.cpus.len(),
        memory.usable_bytes >> 20,
        memory.heap_bytes >> 20,
        memory.frames_free
    );
    log::info!(
        "exitless: TSC {} kHz from {}; local APIC in {} mode, {} timer; {}; PCI config via {}",
        khz,
        Source::from_raw(BOOT.tsc_source.load(Ordering::Relaxed)).name(),
        if BOOT.x2apic.load(Ordering::Relaxed) != 0 {
            "x2APIC"
        } else {
            "xAPIC"
        },
        if BOOT.tsc_deadline.load(Ordering::Relaxed) != 0 {
            "TSC-deadline"
        } else {
            "one-shot"
        },
        if BOOT.under_shim.load(Ordering::Relaxed) != 0 {
            "under the Exitless shim"
        } else {
            "no Exitless shim"
        },
        match pci {
            pci::Access::Ecam(e) => alloc::format!("ECAM at {:#x}", e.base),
            pci::Access::Ports => alloc::string::String::from("ports 0xCF8/0xCFC"),
        }
    );
    if cmdline.as_str().is_empty() {
        log::info!("exitless: empty command line");
    } else {
        log::info!("exitless: command line: {}", cmdline.as_str());
    }
    SYSTEM.call_once(|| System {
        cmdline,
        platform,
        pci,
        memory,
    });

    let now = rdtsc();
    // Under the shim, tell it too (it reports boot time to main); elsewhere NoSys.
    let _ = sys::hypercall(para_abi::hypercall::Call::MainReached, us(entry, now));
    crate::println!(
        "boot: main reached {} us after entry (TSC): ring 0 {} us, ring 3 bring-up {} us",
        us(entry, now),
        us(entry, BOOT.tsc_at_user.load(Ordering::Relaxed)),
        us(BOOT.tsc_at_user.load(Ordering::Relaxed), now)
    );
    // SAFETY: the image defines it with `entry!`; it runs in ring 3 like us.
    let code = unsafe { exitless_app_main() };
    sys::exit(u64::from(code.unsigned_abs()))
}
