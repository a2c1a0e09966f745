//! Exitless doorbells (M1): where offered, 10,000 events reach the host's
//! monitor with no exit of their own; where not (QEMU), the manager says so.
//! The exits between the two stats marks are checked by the xtask leg from
//! the shim's statistics.

use core::time::Duration;
use guest_kernel::arch::BOOT;
use guest_kernel::rt::doorbell::{self, DoorbellError};
use guest_kernel::rt::sys;
use guest_kernel::rt::time::Instant;
use guest_kernel::{check, check_eq, ktest, println};
use para_abi::doorbell::device::SINK;
use para_abi::doorbell::record::{Event, Op};
use para_abi::hypercall::Call;

/// Labels of the stats marks around the burst (the xtask leg reads them).
pub const MARK_BEFORE: u64 = 1;
pub const MARK_AFTER: u64 = 2;
const EVENTS: u32 = 10_000;

ktest!(
    fn ten_thousand_events_to_the_sink() {
        let under_shim = BOOT.under_shim.load(core::sync::atomic::Ordering::Relaxed) != 0;
        let features = guest_kernel::arch::cpu::cpuid(para_abi::discovery::LEAF_FEATURES, 0).eax;
        let offered = under_shim && features & para_abi::discovery::features::DOORBELLS != 0;
        let d = match doorbell::get() {
            Ok(d) => d,
            Err(e) => {
                check!(!offered, "the shim offers doorbells, yet: {e}");
                check_eq!(
                    e,
                    DoorbellError::Unavailable,
                    "no para region outside the shim"
                );
                return Ok(());
            }
        };
        check!(offered, "doorbells work although nobody offered them");
        let (sent0, over0, kicks0) = d.counters();
        sys::hypercall(Call::StatsMark, MARK_BEFORE).map_err(|e| alloc::format!("mark: {e:?}"))?;
        // Batches of half the ring, each drained before the next: a full ring
        // would coalesce events (by design), and this test counts them one by one.
        let batch = u32::try_from(d.capacity() / 2).unwrap_or(1).max(1);
        let t0 = Instant::now();
        let mut busy = Duration::ZERO;
        let mut sent_so_far = 0;
        while sent_so_far < EVENTS {
            let n = batch.min(EVENTS - sent_so_far);
            let tb = Instant::now();
            for i in sent_so_far..sent_so_far + n {
                let _ = d.send(Event {
                    device: SINK,
                    queue: 0,
                    op: Op::Notify,
                    arg: i as u16,
                });
            }
            busy += tb.elapsed();
            sent_so_far += n;
            let deadline = Instant::now()
                .checked_add(Duration::from_secs(5))
                .ok_or("time")?;
            while !d.drained() && Instant::now() < deadline {
                core::hint::spin_loop();
            }
            check!(
                d.drained(),
                "the monitor consumed a batch of {n} within 5 s"
            );
        }
        let drained_in = t0.elapsed();
        let sent_in = busy;
        sys::hypercall(Call::StatsMark, MARK_AFTER).map_err(|e| alloc::format!("mark: {e:?}"))?;
        let (sent, over, kicks) = d.counters();
        check_eq!(sent - sent0, u64::from(EVENTS));
        check_eq!(
            over - over0,
            0,
            "no event was coalesced (the ring never filled)"
        );
        println!(
            "report: doorbell: {EVENTS} events to the sink in {} us ({} ns/event from ring 3), all consumed after {} us; {} coalesced on overflow, {} trapping kicks",
            sent_in.as_micros(),
            sent_in.as_nanos() / u128::from(EVENTS),
            drained_in.as_micros(),
            over - over0,
            kicks - kicks0
        );
        Ok(())
    }
);
