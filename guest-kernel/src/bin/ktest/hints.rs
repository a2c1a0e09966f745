//! Interrupt-vCPU hints (M2): offered by the shim only (QEMU: unavailable and
//! the default placement stays), and the driver-side follower acts once per
//! hint generation, ignores vCPUs the guest lacks and retries torn records.

use alloc::boxed::Box;
use core::sync::atomic::Ordering;
use guest_kernel::arch::BOOT;
use guest_kernel::rt::hints::{self, Follower, HintsError};
use guest_kernel::rt::smp;
use guest_kernel::rt::start::system;
use guest_kernel::{check, check_eq, ktest};
use para_abi::discovery::{LEAF_FEATURES, features};
use para_abi::hints::{ApicSet, Hints, PAGE_BYTES, ReadError, key};

ktest!(
    fn hints_are_offered_by_the_shim_only() {
        let under_shim = BOOT.under_shim.load(Ordering::Relaxed) != 0;
        let offered = under_shim
            && guest_kernel::arch::cpu::cpuid(LEAF_FEATURES, 0).eax & features::HINTS != 0;
        match hints::get() {
            Ok(page) => {
                check!(offered, "a hints page although none was offered");
                for r in page.records {
                    check!(
                        !matches!(r.read(), Err(ReadError::Inconsistent)),
                        "the shim wrote an inconsistent record"
                    );
                }
            }
            Err(HintsError::Off) => check!(system().cmdline.get("hints") == Some("off")),
            Err(HintsError::Unavailable) => check!(!offered, "offered, yet unavailable"),
            Err(e) => check!(false, "hints page: {e}"),
        }
        Ok(())
    }
);

#[repr(C, align(4096))]
struct Page([u8; PAGE_BYTES]);

ktest!(
    fn follower_acts_once_per_generation_and_ignores_bad_hints() {
        let cpu = usize::from(smp::online() >= 2);
        let (a0, a1) = (smp::apic_id(0).unwrap_or(0), smp::apic_id(cpu).unwrap_or(0));
        let page = Box::new(Page([0; PAGE_BYTES]));
        // SAFETY: page-sized, aligned, outlives the views, accessed atomically.
        let h = unsafe { Hints::from_ptr(page.0.as_ptr()) };
        h.init();
        let set = |id: u32| {
            let mut s = ApicSet::default();
            s.insert(id);
            s
        };
        // `cpu` plays the vCPU that processes the queue: hints naming it are followed.
        let mut f = Follower::new(5, 0, a0);
        check_eq!(f.check(&h, cpu), None, "no record yet");
        let before = hints::decisions();
        h.records[3].publish(key(5, 0), 1, &set(a1));
        let want = if a1 == a0 { None } else { Some(cpu) };
        check_eq!(f.check(&h, cpu), want, "a new hint moves the entry");
        check_eq!(
            f.check(&h, cpu),
            None,
            "the same generation is not acted on twice"
        );
        // The entry follows (as the driver does on success): the same set again
        // is "already there".
        f.set_current(a1);
        h.records[3].publish(key(5, 0), 1, &set(a1));
        check_eq!(f.check(&h, cpu), None);
        f.set_current(a0);
        // A vCPU this guest does not have: ignored, default placement kept.
        h.records[3].publish(key(5, 0), 1, &set(250));
        check_eq!(f.check(&h, cpu), None);
        // A record torn mid-write is left for a later interrupt, then followed.
        let g = h.records[3].generation.load(Ordering::Relaxed);
        h.records[3].generation.store(g + 1, Ordering::Relaxed);
        check_eq!(f.check(&h, cpu), None);
        h.records[3].publish(key(5, 0), 1, &set(a1));
        check_eq!(f.check(&h, cpu), want, "the torn record is retried");
        // Another queue's record is not ours.
        h.records[4].publish(key(5, 1), 1, &set(a1));
        check_eq!(Follower::new(5, 2, a0).check(&h, cpu), None);
        let mid = hints::decisions();
        check_eq!(mid.seen - before.seen, 4);
        check!(mid.already > before.already);
        check_eq!(mid.ignored - before.ignored, 1);
        check!(mid.torn > before.torn);
        // A hint naming a vCPU that does not process the queue is declined:
        // the interrupt would land away from the stack and need a wake IPI.
        if a1 != a0 {
            let mut g = Follower::new(6, 0, a0);
            h.records[5].publish(key(6, 0), 1, &set(a1));
            check_eq!(
                g.check(&h, 0),
                None,
                "a hint away from the stack is declined"
            );
            check_eq!(hints::decisions().declined - mid.declined, 1);
            // Its next generation naming the processing vCPU as well is followed.
            let mut both = set(a1);
            both.insert(a0);
            g.set_current(a1);
            h.records[5].publish(key(6, 0), 1, &both);
            check_eq!(g.check(&h, 0), None, "already on a hinted vCPU");
            h.records[5].publish(key(6, 0), 1, &set(a0));
            check_eq!(
                g.check(&h, 0),
                Some(0),
                "a hint naming the stack's vCPU is followed"
            );
        }
        Ok(())
    }
);
