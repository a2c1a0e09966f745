//! M3 upcalls: where the shim offers them, an upcall posted while this CPU
//! runs with IF = 0 (ring 0, `cli`) arrives after `sti`, outside the interrupt
//! shadow of `sti` and of `mov ss`, exactly once; a storm of pings to a CPU
//! that masks often loses and duplicates nothing. Under QEMU the runtime says
//! "unavailable". The xtask leg also checks the shim's counters add up.

use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use guest_kernel::abi::upcall_probe as probe;
use guest_kernel::arch::cpu::rdtsc;
use guest_kernel::ktest::{Stop, TestResult};
use guest_kernel::percpu;
use guest_kernel::rt::ktest_runner::require;
use guest_kernel::rt::time::{Instant, cycles_to_duration, duration_to_cycles};
use guest_kernel::rt::upcall::{self, Class, UpcallError};
use guest_kernel::rt::{irq, sys};
use guest_kernel::{check, check_eq, ktest, println};
use para_abi::discovery::features;
use para_abi::hypercall::Call;

/// Labels of the stats marks around the storm (the bench reads them).
pub const MARK_STORM_BEFORE: u64 = 0x3301;
pub const MARK_STORM_AFTER: u64 = 0x3302;

/// Pings the shim posts in the storm test, one every `STORM_INTERVAL_US`.
const STORM_PINGS: u32 = 4000;
const STORM_INTERVAL_US: u32 = 100;

static PINGS: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static LAST_AT: AtomicU64 = AtomicU64::new(0);

fn on_ping(_: Class, n: u32) {
    LAST_AT.store(rdtsc(), Ordering::Relaxed);
    CALLS.fetch_add(1, Ordering::Relaxed);
    PINGS.fetch_add(u64::from(n), Ordering::Release);
}

/// Sets this CPU up for upcalls where offered; where not, the test skips once
/// the runtime has correctly said "unavailable".
fn setup() -> TestResult {
    match upcall::init() {
        Ok(()) => {
            check!(upcall::offered(), "init succeeded without an offer");
            upcall::register_upcall(Class::Ping, on_ping);
            PINGS.store(0, Ordering::Relaxed);
            CALLS.store(0, Ordering::Relaxed);
            LAST_AT.store(0, Ordering::Relaxed);
            // Run anything already pending so that the vector's bit starts clear.
            irq::restore(irq::disable());
            Ok(())
        }
        Err(e) => {
            check!(!upcall::offered(), "the shim offers upcalls, yet: {e}");
            check_eq!(e, UpcallError::Unavailable);
            require(features::UPCALLS)?;
            Err("CPUID offers upcalls, the runtime does not see them".into())
        }
    }
}

fn masked_ping(mov_ss: bool) -> TestResult {
    setup()?;
    let cpu = percpu::cpu_id();
    let taken0 = upcall::taken(cpu, Class::Ping);
    let masked = Duration::from_millis(2);
    let was = irq::disable();
    let open = duration_to_cycles(Duration::from_micros(200));
    let r = sys::upcall_masked_spin(duration_to_cycles(masked), mov_ss, 1, open);
    let returned = rdtsc();
    irq::restore(was);
    let (sti_tsc, seen) = r.map_err(|e| alloc::format!("kernel call: {e:?}"))?;
    check_eq!(seen & probe::AT_ENTRY, 0, "vector pending before the test");
    check_eq!(seen & probe::PING_FAILED, 0, "the shim refused the ping");
    check_eq!(
        seen & probe::WHILE_MASKED,
        0,
        "delivered while IF was 0 (probe {seen:#x})"
    );
    check_eq!(
        seen & probe::IN_SHADOW,
        0,
        "delivered inside the interrupt shadow (probe {seen:#x})"
    );
    // Where it landed once IF was 1: this platform emulates ring 0 and has been
    // measured to take the interrupt only at some later exit of the emulated
    // stretch (or on the return to ring 3), so that is reported, not asserted.
    let landed = if seen & probe::AFTER_SHADOW != 0 {
        "at the first instruction after the shadow"
    } else if seen & probe::LATER != 0 {
        "later in the IF=1 stretch"
    } else if seen & probe::AFTER_CLI != 0 {
        "at the closing cli"
    } else {
        "on the return to ring 3"
    };
    // The shim's naive `--upcalls poll` comparison finds the open window only at
    // its next 20 µs poll, possibly after the kernel call returned: give it a
    // (generous) bound rather than demanding delivery by now.
    let deadline = Instant::now()
        .checked_add(Duration::from_millis(200))
        .ok_or("overflow")?;
    while PINGS.load(Ordering::Acquire) == 0 && Instant::now().0 < deadline.0 {
        irq::restore(irq::disable());
        core::hint::spin_loop();
    }
    check_eq!(PINGS.load(Ordering::Acquire), 1, "one ping arrived");
    check_eq!(CALLS.load(Ordering::Relaxed), 1, "the handler ran once");
    check_eq!(upcall::taken(cpu, Class::Ping) - taken0, 1);
    let at = LAST_AT.load(Ordering::Relaxed);
    check!(at > sti_tsc, "handled after sti");
    // Nothing more comes later: exactly once.
    let until = Instant::now()
        .checked_add(Duration::from_millis(10))
        .ok_or("overflow")?;
    while Instant::now().0 < until.0 {
        core::hint::spin_loop();
    }
    irq::restore(irq::disable());
    check_eq!(PINGS.load(Ordering::Acquire), 1, "no duplicate");
    println!(
        "report: upcall masked {} ms{}: landed {landed}; sti -> kernel return {} us, sti -> handler {} us",
        masked.as_millis(),
        if mov_ss { " (sti; mov ss)" } else { "" },
        cycles_to_duration(returned - sti_tsc).as_micros(),
        cycles_to_duration(at - sti_tsc).as_micros()
    );
    Ok(())
}

ktest!(
    fn upcall_posted_while_masked_arrives_after_sti_once() {
        masked_ping(false)
    }
);

ktest!(
    fn upcall_respects_the_mov_ss_shadow() {
        masked_ping(true)
    }
);

ktest!(
    fn upcall_storm_to_a_cpu_that_masks_often() {
        let ready = setup();
        if matches!(ready, Err(Stop::Skipped(_))) {
            check!(
                sys::hypercall(Call::UpcallStorm, para_abi::upcall::storm_arg(1, 0)).is_err(),
                "a storm request outside the shim fails"
            );
        }
        ready?;
        let cpu = percpu::cpu_id();
        let taken0 = upcall::taken(cpu, Class::Ping);
        let (irqs0, empty0) = upcall::interrupts();
        let arg = para_abi::upcall::storm_arg(STORM_PINGS, STORM_INTERVAL_US);
        sys::hypercall(Call::StatsMark, MARK_STORM_BEFORE)
            .map_err(|e| alloc::format!("mark: {e:?}"))?;
        sys::hypercall(Call::UpcallStorm, arg).map_err(|e| alloc::format!("storm: {e:?}"))?;
        let t0 = Instant::now();
        let limit = t0.checked_add(Duration::from_secs(30)).ok_or("overflow")?;
        let (mut ring0_masked, mut ring3_masked) = (0u32, 0u32);
        let short = duration_to_cycles(Duration::from_micros(30));
        while PINGS.load(Ordering::Acquire) < u64::from(STORM_PINGS) && Instant::now().0 < limit.0 {
            // Real IF = 0 windows (ring 0), then the virtual flag in ring 3.
            let was = irq::disable();
            let _ = sys::upcall_masked_spin(short, false, 0, 0);
            irq::restore(was);
            ring0_masked += 1;
            irq::without(|| {
                let end = rdtsc() + short;
                while rdtsc() < end {
                    core::hint::spin_loop();
                }
            });
            ring3_masked += 1;
        }
        let took = t0.elapsed();
        // Anything still in flight would show up now as a duplicate.
        let settle = Instant::now()
            .checked_add(Duration::from_millis(20))
            .ok_or("overflow")?;
        while Instant::now().0 < settle.0 {
            irq::restore(irq::disable());
        }
        sys::hypercall(Call::StatsMark, MARK_STORM_AFTER)
            .map_err(|e| alloc::format!("mark: {e:?}"))?;
        let (irqs, empty) = upcall::interrupts();
        check_eq!(
            PINGS.load(Ordering::Acquire),
            u64::from(STORM_PINGS),
            "every ping arrived, none twice"
        );
        check_eq!(
            upcall::taken(cpu, Class::Ping) - taken0,
            u64::from(STORM_PINGS)
        );
        check!(
            CALLS.load(Ordering::Relaxed) <= irqs - irqs0,
            "a handler run per interrupt at most"
        );
        println!(
            "report: upcall storm {STORM_PINGS} pings every {STORM_INTERVAL_US} us: {} ms, \
             {} interrupts ({} empty), {} handler runs, {ring0_masked} ring-0 and \
             {ring3_masked} ring-3 masked phases",
            took.as_millis(),
            irqs - irqs0,
            empty - empty0,
            CALLS.load(Ordering::Relaxed)
        );
        Ok(())
    }
);

ktest!(
    fn upcalls_are_taken_on_every_cpu_from_bring_up() {
        let cpus = guest_kernel::rt::smp::online();
        if !upcall::offered() {
            for cpu in 0..cpus {
                check!(
                    !upcall::enabled_on(cpu),
                    "cpu{cpu} takes upcalls under QEMU"
                );
            }
        }
        require(features::UPCALLS)?;
        for cpu in 0..cpus {
            check!(
                upcall::enabled_on(cpu),
                "bring-up left cpu{cpu} without upcalls"
            );
        }
        // Set up again on the last CPU, as a test would: harmless. Then a ping
        // that CPU asks for arrives there.
        let last = cpus - 1;
        let before = upcall::taken(last, Class::Ping);
        let r = guest_kernel::rt::smp::run_on_wait(last, Duration::from_secs(1), || {
            upcall::init()
                .map_err(|e| alloc::format!("init again: {e}"))
                .and_then(|()| {
                    sys::hypercall(Call::UpcallPing, 1).map_err(|e| alloc::format!("ping: {e:?}"))
                })
        })
        .map_err(|e| alloc::format!("run_on cpu{last}: {e:?}"))?;
        check!(r.is_ok(), "on cpu{last}: {r:?}");
        let deadline = Instant::now()
            .checked_add(Duration::from_secs(1))
            .ok_or("overflow")?;
        while upcall::taken(last, Class::Ping) == before && Instant::now().0 < deadline.0 {
            core::hint::spin_loop();
        }
        check_eq!(
            upcall::taken(last, Class::Ping) - before,
            1,
            "the ping arrived on cpu{last}, once"
        );
        Ok(())
    }
);
