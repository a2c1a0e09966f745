//! Kernel calls: results, and rejection of bad arguments.

use guest_kernel::abi::{SysError, USER_MIN, vector};
use guest_kernel::rt::{irq, smp, sys};
use guest_kernel::{check, check_eq, ktest};

ktest!(
    fn write_returns_its_length() {
        let msg = b"kcall: console output from ring 3\n";
        check_eq!(sys::write(msg), Ok(msg.len()));
        check_eq!(sys::write(b""), Ok(0));
        Ok(())
    }
);

ktest!(
    fn write_refuses_kernel_and_wrapping_pointers() {
        // SAFETY: only builds slices whose pointers the kernel must refuse; never read here.
        let kernel = unsafe { core::slice::from_raw_parts(0x10_0000 as *const u8, 16) };
        check_eq!(sys::write(kernel), Err(SysError::Fault));
        check_eq!(sys::raw_call(0, u64::MAX - 4, 16), SysError::Fault as u64);
        check_eq!(sys::raw_call(0, USER_MIN - 8, 16), SysError::Fault as u64);
        Ok(())
    }
);

ktest!(
    fn unknown_calls_and_bad_arguments_are_rejected() {
        check_eq!(sys::raw_call(999, 0, 0), SysError::NoSys as u64);
        check_eq!(sys::raw_call(u64::MAX, 0, 0), SysError::NoSys as u64);
        // Raw port I/O is for the hostile leg's guest only (`kernel.port_io=1`).
        check_eq!(
            sys::port_io(0x80, 1, true, 0, 0),
            SysError::NoSys as u64,
            "ring 3 port I/O without kernel.port_io"
        );
        let me = smp::apic_id(0).ok_or("no APIC id for cpu0")?;
        check_eq!(
            sys::send_ipi(me, 2),
            Err(SysError::Invalid),
            "exception vectors cannot be sent"
        );
        check_eq!(sys::send_ipi(me, vector::SPURIOUS), Err(SysError::Invalid));
        check_eq!(
            sys::start_ap(0, 0, false),
            Err(SysError::Invalid),
            "cpu 0 is never started"
        );
        check_eq!(
            sys::pci_read(0, 2),
            Err(SysError::Invalid),
            "unaligned offset"
        );
        check_eq!(
            sys::ring0_loop(u64::MAX).map(|_| ()),
            Err(SysError::Invalid)
        );
        Ok(())
    }
);

static SELF_IPIS: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

fn count_self_ipi(_: u8) {
    SELF_IPIS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

ktest!(
    fn halt_returns_when_an_interrupt_is_pending() {
        use core::sync::atomic::Ordering;
        irq::register(vector::TEST_IPI, count_self_ipi);
        SELF_IPIS.store(0, Ordering::Relaxed);
        let me = smp::apic_id(guest_kernel::percpu::cpu_id()).ok_or("no APIC id")?;
        let was = irq::disable();
        sys::send_ipi(me, vector::TEST_IPI).map_err(|e| alloc::format!("{e:?}"))?;
        // The IPI is pending (delivery masked): halt must come straight back.
        let t = guest_kernel::rt::time::Instant::now();
        sys::halt();
        let waited = t.elapsed();
        check_eq!(
            SELF_IPIS.load(Ordering::Relaxed),
            0,
            "masked: handler has not run"
        );
        irq::restore(was);
        check_eq!(
            SELF_IPIS.load(Ordering::Relaxed),
            1,
            "unmasking ran it exactly once"
        );
        check!(waited.as_millis() < 1000, "halt returned after {waited:?}");
        irq::unregister(vector::TEST_IPI);
        Ok(())
    }
);

ktest!(
    fn hypercalls_reach_the_shim_only_and_exit_is_not_forwarded() {
        use guest_kernel::arch::BOOT;
        use para_abi::hypercall::{Call, Status};
        let under_shim = BOOT.under_shim.load(core::sync::atomic::Ordering::Relaxed) != 0;
        let main_reached = sys::hypercall(Call::MainReached, 1);
        let exit = sys::hypercall(Call::Exit, 0);
        // Only the kernel's trap path hands a trap frame to the debugger.
        let debug_trap = sys::hypercall(Call::DebugTrap, 0x10_0000);
        if under_shim {
            check_eq!(
                debug_trap,
                Err(SysError::Invalid),
                "DebugTrap is not ring 3's to make"
            );
            check_eq!(
                main_reached,
                Ok(Status::Ok as u64),
                "the shim accepts MainReached"
            );
            check_eq!(
                exit,
                Err(SysError::Invalid),
                "Exit only through the exit kernel call"
            );
        } else {
            check_eq!(main_reached, Err(SysError::NoSys));
            check_eq!(exit, Err(SysError::NoSys));
            check_eq!(debug_trap, Err(SysError::NoSys));
        }
        Ok(())
    }
);
