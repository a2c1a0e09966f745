//! Exitless doorbells (M1): where offered, 10,000 events reach the host's
//! monitor with no exit of their own; where not (QEMU), the manager says so.
//! The exits between the two stats marks are checked by the xtask leg from
//! the shim's statistics.

use core::time::Duration;
use guest_kernel::ktest::Stop;
use guest_kernel::rt::doorbell::{self, DoorbellError};
use guest_kernel::rt::ktest_runner::{require, require_spare_doorbell_range};
use guest_kernel::rt::sys;
use guest_kernel::rt::time::Instant;
use guest_kernel::{check, check_eq, ktest, println};
use para_abi::discovery::features;
use para_abi::doorbell::device::SINK;
use para_abi::doorbell::record::{Event, Op};
use para_abi::hypercall::Call;

/// Labels of the stats marks around the burst (the xtask leg reads them).
pub const MARK_BEFORE: u64 = 1;
pub const MARK_AFTER: u64 = 2;
const EVENTS: u32 = 10_000;

/// Spins until the monitor has consumed everything `d` sent, for at most 5 s
/// (the caller checks `drained` to say which stage did not finish).
fn wait_drained(d: &doorbell::Doorbells) -> Result<(), &'static str> {
    let deadline = Instant::now()
        .checked_add(Duration::from_secs(5))
        .ok_or("time")?;
    while !d.drained() && Instant::now() < deadline {
        core::hint::spin_loop();
    }
    Ok(())
}

/// The doorbells where the shim offers them. Where it does not, the manager
/// must say "unavailable" and the calling test skips.
fn offered_doorbells() -> Result<&'static doorbell::Doorbells, Stop> {
    let offered = require(features::DOORBELLS);
    match (doorbell::get(), offered) {
        (Ok(d), Ok(())) => Ok(d),
        (Ok(_), Err(_)) => Err("doorbells work although nobody offered them".into()),
        (Err(e), Ok(())) => Err(alloc::format!("the shim offers doorbells, yet: {e}").into()),
        (Err(e), Err(skip)) => {
            check_eq!(
                e,
                DoorbellError::Unavailable,
                "no doorbells outside the shim"
            );
            Err(skip)
        }
    }
}

ktest!(
    fn ten_thousand_events_to_the_sink() {
        let d = offered_doorbells()?;
        // The shim-flood leg starts the burst once the other guest floods.
        if let Some(ms) = guest_kernel::rt::start::system()
            .cmdline
            .get("doorbell.burst_after_ms")
            .and_then(|v| v.parse::<u64>().ok())
        {
            guest_kernel::rt::wait::sleep(Duration::from_millis(ms));
        }
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
            wait_drained(d)?;
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

ktest!(
    fn nic_queue_events_go_to_the_range_of_the_cpu_their_route_names() {
        let d = offered_doorbells()?;
        let routes: alloc::vec::Vec<_> = d.routes().collect();
        // This guest has a NIC: the shim routes its RX and TX queues.
        check!(
            routes.len() >= 2,
            "the shim published routes for the NIC's queues ({} routes)",
            routes.len()
        );
        for r in &routes {
            check_eq!(
                d.host_cpu_for(r.device, r.queue),
                r.host_cpu,
                "the guest keeps a range of the CPU the route names for device {} queue {}",
                r.device,
                r.queue
            );
        }
        // A queue without a route goes to the range for any vCPU.
        check_eq!(d.route(SINK, 0), None);
        check_eq!(d.host_cpu_for(SINK, 0), d.host_cpu());
        Ok(())
    }
);

/// Stats marks around the flood (the shim-flood leg reads them).
pub const MARK_FLOOD_BEFORE: u64 = 0x200;
pub const MARK_FLOOD_AFTER: u64 = 0x201;
/// A device number no guest has (PCI device numbers on bus 0 are below 32).
const NO_DEVICE: u8 = 0x7E;

/// A record body with an undefined operation (9) but a valid check byte.
fn unknown_op_word(position: u64) -> u64 {
    use para_abi::doorbell::record::{SEQUENCE_MASK, check_byte};
    let body = u64::from(SINK) | (9 << 24) | ((position & SEQUENCE_MASK) << 44);
    body | (u64::from(check_byte(body)) << 56)
}

ktest!(
    fn doorbell_flood_of_garbage_is_survived() {
        // Bad input: garbage words, torn and misplaced records,
        // undefined operations, unknown devices and a ring kept full. The host
        // must count and reject them and keep consuming; the shim-flood leg
        // runs this for `doorbell.flood_ms` next to another guest's burst.
        let flood_ms = guest_kernel::rt::start::system()
            .cmdline
            .get("doorbell.flood_ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(2);
        let d = offered_doorbells()?;
        sys::hypercall(Call::StatsMark, MARK_FLOOD_BEFORE)
            .map_err(|e| alloc::format!("mark: {e:?}"))?;
        let deadline = Instant::now()
            .checked_add(Duration::from_millis(flood_ms))
            .ok_or("time")?;
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut rounds = 0u64;
        let (mut raw, mut full) = (0u64, 0u64);
        while Instant::now() < deadline {
            for k in 0..64u32 {
                // xorshift64: garbage that almost never passes the check byte.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let garbage = x;
                let ok = match k % 5 {
                    0 => d.send_raw(|_| garbage),
                    // Torn: a valid record for this slot with one half replaced.
                    1 => d.send_raw(|p| {
                        Event::new(SINK, 0, Op::Notify).encode(p) ^ (garbage & 0xFFFF_FFFF)
                    }),
                    // Misplaced: well-formed, but for another ring position.
                    2 => d.send_raw(|p| Event::new(SINK, 0, Op::Notify).encode(p + 7)),
                    3 => d.send_raw(unknown_op_word),
                    _ => {
                        let _ = d.send(Event::new(NO_DEVICE, (garbage & 0xF) as u16, Op::Notify));
                        continue;
                    }
                };
                if ok {
                    raw += 1;
                } else {
                    full += 1;
                }
            }
            rounds += 1;
        }
        sys::hypercall(Call::StatsMark, MARK_FLOOD_AFTER)
            .map_err(|e| alloc::format!("mark: {e:?}"))?;
        // One well-formed event wakes a parked monitor for the raw words.
        let _ = d.send(Event::new(NO_DEVICE, 0, Op::Notify));
        wait_drained(d)?;
        check!(
            d.drained(),
            "the monitor consumed the whole flood within 5 s"
        );
        check!(raw > 0, "some garbage reached the ring");
        println!(
            "report: doorbell flood: {flood_ms} ms, {} records ({raw} raw garbage, {full} refused by a full ring), {} sends to an unknown device",
            rounds * 64,
            rounds * 64 / 5
        );
        Ok(())
    }
);

/// Stats marks around the re-designation test's events (the shim-redesignate
/// leg counts the sink events between them).
pub const MARK_MOVE_BEFORE: u64 = 0x300;
pub const MARK_MOVE_AFTER: u64 = 0x301;
/// Sink events sent before and after the move.
const MOVE_EVENTS: u32 = 2000;

ktest!(
    fn doorbell_redesignation_keeps_every_event() {
        let d = offered_doorbells()?;
        if require_spare_doorbell_range(d).is_err() {
            // Without a spare range the shim must refuse to move us.
            check!(
                !matches!(sys::hypercall(Call::DoorbellRedesignate, 0), Ok(0)),
                "the shim moved us although it offered no spare range"
            );
        }
        require_spare_doorbell_range(d)?;
        let (lanes, moves0, _) = d.designation_counters();
        let cpu0 = d.host_cpu();
        let was = guest_kernel::rt::irq::disable();
        guest_kernel::rt::irq::enable();
        sys::hypercall(Call::StatsMark, MARK_MOVE_BEFORE)
            .map_err(|e| alloc::format!("mark: {e:?}"))?;
        let send = |n: u32| -> Result<(), alloc::string::String> {
            for i in 0..n {
                let _ = d.send(Event {
                    device: SINK,
                    queue: 1,
                    op: Op::Notify,
                    arg: i as u16,
                });
                if i % 256 == 255 {
                    wait_drained(d)?;
                }
            }
            Ok(())
        };
        send(MOVE_EVENTS)?;
        let r = sys::hypercall(Call::DoorbellRedesignate, 0);
        check!(
            matches!(r, Ok(0)),
            "the shim refused the move although it offered a spare range ({r:?})"
        );
        check!(lanes >= 2, "a spare range was offered: {lanes} ranges");
        // Events keep flowing while the notification is on its way.
        let notified = Instant::now()
            .checked_add(Duration::from_secs(2))
            .ok_or("time")?;
        let mut during = 0u32;
        while d.designation_counters().1 == moves0 && Instant::now() < notified {
            let _ = d.send(Event {
                device: SINK,
                queue: 2,
                op: Op::Notify,
                arg: 0,
            });
            during += 1;
            if during.is_multiple_of(256) {
                while !d.drained() && Instant::now() < notified {
                    core::hint::spin_loop();
                }
            }
        }
        check!(
            d.designation_counters().1 > moves0,
            "the designation notification moved us to the new range within 2 s (vector {:#x} taken {} times, {} unhandled interrupts, {:?})",
            guest_kernel::abi::vector::DOORBELL_NOTIFY,
            guest_kernel::rt::irq::count(0, guest_kernel::abi::vector::DOORBELL_NOTIFY),
            guest_kernel::rt::irq::unhandled(),
            d.designation_counters()
        );
        let cpu1 = d.host_cpu();
        check!(
            cpu1 != cpu0,
            "the new range belongs to another host CPU's monitor"
        );
        send(MOVE_EVENTS)?;
        wait_drained(d)?;
        check!(d.drained(), "both ranges drained");
        check!(
            d.writing_allowed(),
            "the shim granted writing again after the move"
        );
        sys::hypercall(Call::StatsMark, MARK_MOVE_AFTER)
            .map_err(|e| alloc::format!("mark: {e:?}"))?;
        guest_kernel::rt::irq::restore(was);
        let notes = guest_kernel::rt::irq::count(0, guest_kernel::abi::vector::DOORBELL_NOTIFY);
        let ups =
            guest_kernel::rt::upcall::taken(0, guest_kernel::rt::upcall::Class::Redesignation);
        println!(
            "report: doorbell re-designation: monitor cpu {cpu0} -> {cpu1}, {} events sent ({during} while the notification was on its way), {notes} notification(s) on cpu 0, {ups} re-designation upcall(s) on cpu 0",
            2 * MOVE_EVENTS + during
        );
        Ok(())
    }
);
