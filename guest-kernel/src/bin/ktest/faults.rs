//! Exceptions raised in ring 3 come back as reported faults; the suite goes on.

use guest_kernel::rt::fault::{Caught, catch};
use guest_kernel::{check, check_eq, ktest};

fn expect_fault(r: Result<(), Caught>) -> Result<(u64, u64, u64, u64), alloc::string::String> {
    match r {
        Err(Caught::Fault {
            vector,
            error,
            rip,
            cr2,
        }) => Ok((vector, error, rip, cr2)),
        other => Err(alloc::format!("expected a fault, got {other:?}")),
    }
}

ktest!(
    fn ud2_in_ring3_is_reported_as_invalid_opcode() {
        let (vector, _, rip, _) = expect_fault(catch(|| {
            // SAFETY: deliberately raises #UD; the recovery scope catches it.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) }
        }))?;
        check_eq!(vector, 6);
        // SAFETY: reads the two bytes at the reported RIP, inside our own text.
        let bytes = unsafe { core::ptr::read(rip as *const [u8; 2]) };
        check_eq!(bytes, [0x0F, 0x0B]);
        Ok(())
    }
);

ktest!(
    fn null_read_is_a_user_page_fault() {
        let (vector, error, _, cr2) = expect_fault(catch(|| {
            // SAFETY: deliberately dereferences null; page 0 is supervisor-only.
            unsafe { core::ptr::read_volatile(core::ptr::null::<u64>()) };
        }))?;
        check_eq!(vector, 14);
        check_eq!(cr2, 0);
        check!(error & 0b100 != 0, "error code has U/S set: {error:#x}");
        Ok(())
    }
);

ktest!(
    fn kernel_memory_is_protected_from_ring3() {
        // The kernel-private megabyte holds the GDT, IDT, TSSes and kernel stacks.
        let target = 0x10_8000u64;
        let (vector, error, _, cr2) = expect_fault(catch(|| {
            // SAFETY: deliberately writes kernel memory; must fault, not land.
            unsafe { core::ptr::write_volatile(target as *mut u64, 0xdead) };
        }))?;
        check_eq!(vector, 14);
        check_eq!(cr2, target);
        check_eq!(error & 0b111, 0b111, "present, write, user");
        Ok(())
    }
);

ktest!(
    fn unmapped_memory_above_4g_faults() {
        let target = 0x1_2345_6000u64;
        let (vector, error, _, cr2) = expect_fault(catch(|| {
            // SAFETY: deliberately reads an unmapped address.
            unsafe { core::ptr::read_volatile(target as *const u64) };
        }))?;
        check_eq!(vector, 14);
        check_eq!(cr2, target);
        check_eq!(error & 1, 0, "not present");
        Ok(())
    }
);

ktest!(
    fn privileged_instruction_in_ring3_is_a_gp() {
        let (vector, ..) = expect_fault(catch(|| {
            // SAFETY: deliberately executes `cli` at CPL 3 with IOPL 0: #GP.
            unsafe { core::arch::asm!("cli", options(nomem, nostack)) }
        }))?;
        check_eq!(vector, 13);
        Ok(())
    }
);

ktest!(
    fn panic_in_ring3_is_caught_with_its_message() {
        let r = catch(|| -> u32 { panic!("deliberate test panic {}", 42) });
        match r {
            Err(Caught::Panic(msg)) => {
                check!(msg.contains("deliberate test panic 42"), "message: {msg}");
            }
            other => return Err(alloc::format!("expected a panic, got {other:?}").into()),
        }
        // And after it, normal code runs on: nested recovery scopes still work.
        check_eq!(catch(|| 5).ok(), Some(5));
        Ok(())
    }
);
