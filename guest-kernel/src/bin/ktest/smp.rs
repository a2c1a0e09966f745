//! Application processors, per-CPU data and IPIs.

use core::sync::atomic::{AtomicU32, Ordering};
use core::time::Duration;
use guest_kernel::abi::vector;
use guest_kernel::percpu::{self, CPUS};
use guest_kernel::rt::start::system;
use guest_kernel::rt::time::{Instant, duration_to_cycles};
use guest_kernel::rt::{irq, smp};
use guest_kernel::{check, check_eq, ktest, println};

const WAIT: Duration = Duration::from_secs(2);

ktest!(
    fn every_described_cpu_is_online() {
        let described = system().platform.cpus.iter().filter(|c| c.usable).count();
        check!(
            described >= 2,
            "these tests run with at least 2 CPUs; ACPI describes {described}"
        );
        check_eq!(smp::online(), described);
        for (cpu, pc) in CPUS.iter().enumerate().take(smp::online()).skip(1) {
            check!(
                pc.online.load(Ordering::Acquire) != 0,
                "cpu{cpu} reported in"
            );
        }
        Ok(())
    }
);

ktest!(
    fn per_cpu_data_belongs_to_its_cpu() {
        check_eq!(percpu::cpu_id(), 0, "tests run on the boot CPU");
        for (cpu, pc) in CPUS.iter().enumerate().take(smp::online()).skip(1) {
            let (id, apic, self_ptr) = smp::run_on_wait(cpu, WAIT, || {
                let pc = percpu::current();
                (
                    pc.id(),
                    pc.apic_id.load(Ordering::Relaxed),
                    pc.self_ptr.load(Ordering::Relaxed),
                )
            })
            .map_err(|e| alloc::format!("run_on_wait(cpu{cpu}): {e:?}"))?;
            check_eq!(id, cpu);
            check_eq!(self_ptr, core::ptr::from_ref(pc) as u64);
            check!(
                system().platform.cpus.iter().any(|c| c.apic_id == apic),
                "APIC id {apic} is in the MADT"
            );
            check!(
                apic != CPUS[0].apic_id.load(Ordering::Relaxed),
                "distinct from the boot CPU's"
            );
        }
        Ok(())
    }
);

static PONGS: AtomicU32 = AtomicU32::new(0);

/// On CPU 1 this bounces the IPI back to CPU 0; on CPU 0 it counts the return.
fn ping_pong(v: u8) {
    if percpu::cpu_id() == 0 {
        PONGS.fetch_add(1, Ordering::Release);
    } else {
        let _ = smp::send_ipi(0, v);
    }
}

ktest!(
    fn ipi_round_trip_between_two_cpus() {
        check!(smp::online() >= 2, "needs two CPUs");
        irq::register(vector::TEST_IPI, ping_pong);
        PONGS.store(0, Ordering::Relaxed);
        let mut rtts = alloc::vec::Vec::new();
        for i in 0..50u32 {
            let t = Instant::now();
            smp::send_ipi(1, vector::TEST_IPI).map_err(|e| alloc::format!("{e:?}"))?;
            let limit = t.0 + duration_to_cycles(WAIT);
            while PONGS.load(Ordering::Acquire) == i && Instant::now().0 < limit {
                core::hint::spin_loop();
            }
            check_eq!(
                PONGS.load(Ordering::Acquire),
                i + 1,
                "round trip {i} completed"
            );
            rtts.push(t.elapsed().as_micros() as u64);
        }
        irq::unregister(vector::TEST_IPI);
        rtts.sort_unstable();
        println!(
            "report: IPI round trip cpu0->cpu1->cpu0: median {} us, min {} us, max {} us (50 trips)",
            rtts[25], rtts[0], rtts[49]
        );
        Ok(())
    }
);

ktest!(
    fn closures_run_on_the_chosen_cpu() {
        let last = smp::online() - 1;
        let sum = smp::run_on_wait(last, WAIT, || (1..=100u64).sum::<u64>())
            .map_err(|e| alloc::format!("{e:?}"))?;
        check_eq!(sum, 5050);
        check!(
            smp::run_on(smp::online(), || {}).is_err(),
            "no such CPU is an error"
        );
        Ok(())
    }
);
