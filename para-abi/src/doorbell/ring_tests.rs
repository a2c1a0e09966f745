//! Single-threaded and hostile-memory tests of the ring (the std-thread stress test
//! is `tests/ring_stress.rs`, the model checks `ring_loom.rs`).

use std::collections::BTreeSet;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::doorbell::designation::{ANY_SOURCE, Designation, SourceType};

struct Mem {
    status: RingStatus,
    header: RingHeader,
    slots: Vec<AtomicU64>,
}

impl Mem {
    fn new(capacity: usize) -> Self {
        Self {
            status: RingStatus::new(),
            header: RingHeader::new(),
            slots: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn ring(&self) -> Ring<'_> {
        Ring::new(&self.status, &self.header, &self.slots).unwrap()
    }
}

fn drain(c: &mut Consumer, ring: &Ring<'_>) -> (Vec<Event>, Vec<Rejection>) {
    let mut events = Vec::new();
    let mut rejections = Vec::new();
    loop {
        match c.poll(ring) {
            Polled::Event(e) => events.push(e),
            Polled::Rejected(r) => rejections.push(r),
            Polled::Empty => return (events, rejections),
        }
    }
}

fn pending(c: &mut Consumer, ring: &Ring<'_>) -> BTreeSet<(u8, u16, u8, bool)> {
    let mut set = BTreeSet::new();
    c.drain_overflow(ring, |p| {
        set.insert(match p {
            Pending::Event(e) => (e.device, e.queue, e.op as u8, false),
            Pending::Device(d) => (d, 0, 0, true),
        });
    });
    set
}

#[test]
fn capacities_are_checked() {
    for n in [0, 1, 3, 6, MAX_CAPACITY as usize * 2] {
        let m = Mem::new(n);
        assert_eq!(
            Ring::new(&m.status, &m.header, &m.slots).err(),
            Some(RingError::BadCapacity(n))
        );
    }
    let m = Mem::new(MAX_CAPACITY as usize);
    assert_eq!(m.ring().capacity(), u64::from(MAX_CAPACITY));
}

#[test]
fn events_arrive_in_order_across_many_laps() {
    let m = Mem::new(4);
    let ring = m.ring();
    let mut c = Consumer::new();
    for lap in 0u16..5000 {
        for q in 0..3u16 {
            let e = Event {
                device: 1,
                queue: q,
                op: Op::TxKick,
                arg: lap,
            };
            let sent = ring.send(e);
            assert!(matches!(sent.via, Via::Ring(_)));
            assert!(!sent.kick);
        }
        let (events, rejections) = drain(&mut c, &ring);
        assert!(rejections.is_empty());
        assert_eq!(events.len(), 3);
        for (q, e) in events.iter().enumerate() {
            assert_eq!((e.queue, e.arg), (q as u16, lap));
        }
    }
    assert_eq!(c.position(), 15_000);
    assert_eq!(m.status.head.load(Ordering::Relaxed), 15_000);
    assert!(m.slots.iter().all(|s| s.load(Ordering::Relaxed) == 0));
}

#[test]
fn a_full_ring_coalesces_instead_of_losing() {
    let m = Mem::new(2);
    let ring = m.ring();
    let mut c = Consumer::new();
    assert_eq!(ring.send(Event::new(0, 0, Op::Notify)).via, Via::Ring(0));
    assert_eq!(ring.send(Event::new(0, 1, Op::Notify)).via, Via::Ring(1));
    // Full: these coalesce, twice the same key included.
    for e in [
        Event::new(2, 5, Op::RxRefill),
        Event::new(2, 5, Op::RxRefill),
        Event::new(15, 15, Op::Custom),
        Event::new(3, 16, Op::TxKick),
        Event::new(200, 0, Op::Notify),
    ] {
        assert_eq!(ring.send(e).via, Via::Overflow);
    }
    let (events, _) = drain(&mut c, &ring);
    assert_eq!(events.len(), 2);
    let set = pending(&mut c, &ring);
    let expected: BTreeSet<_> = [
        (2, 5, Op::RxRefill as u8, false),
        (15, 15, Op::Custom as u8, false),
        (3, 0, 0, true),
        (200, 0, 0, true),
    ]
    .into_iter()
    .collect();
    assert_eq!(set, expected);
    // Drained means cleared.
    assert!(pending(&mut c, &ring).is_empty());
    assert_eq!(m.header.overflow_summary.load(Ordering::Relaxed), 0);
    // Room again.
    assert_eq!(ring.send(Event::new(0, 0, Op::Notify)).via, Via::Ring(2));
}

#[test]
fn every_overflow_bit_maps_back_to_its_key() {
    for device in 0..=255u8 {
        for queue in [0u16, 1, 15, 16, 300, u16::MAX] {
            for op in Op::ALL {
                let e = Event::new(device, queue, op);
                let (w, b) = overflow_position(&e);
                assert!(w < OVERFLOW_WORDS && b < 64);
                let p = pending_at(w, b).unwrap();
                if (device as usize) < EXACT_DEVICES && (queue as usize) < EXACT_QUEUES {
                    assert_eq!(p, Pending::Event(e));
                } else {
                    assert_eq!(p, Pending::Device(device));
                }
            }
        }
    }
    assert_eq!(pending_at(OVERFLOW_WORDS, 0), None);
    assert_eq!(pending_at(0, 64), None);
}

#[test]
fn park_handshake_single_threaded() {
    let m = Mem::new(4);
    let ring = m.ring();
    let mut c = Consumer::new();
    assert_eq!(c.park(&ring), Park::Sleep);
    assert!(ring.is_parked());
    // A producer publishing now must kick.
    let sent = ring.send(Event::new(0, 0, Op::Notify));
    assert!(sent.kick);
    c.unpark(&ring);
    assert!(!ring.is_parked());
    // Work present: parking is refused.
    assert_eq!(c.park(&ring), Park::Retry);
    assert!(!ring.is_parked());
    assert_eq!(drain(&mut c, &ring).0.len(), 1);
    // Overflow present: refused too.
    assert!(!ring.send(Event::new(0, 0, Op::Notify)).kick);
    for _ in 0..8 {
        let _ = ring.send(Event::new(1, 1, Op::Notify));
    }
    assert_eq!(drain(&mut c, &ring).0.len(), 4);
    assert_eq!(c.park(&ring), Park::Retry);
    assert_eq!(pending(&mut c, &ring).len(), 1);
    assert_eq!(c.park(&ring), Park::Sleep);
}

#[test]
fn hostile_slots_are_rejected_with_reasons() {
    let m = Mem::new(8);
    let ring = m.ring();
    let mut c = Consumer::new();
    let good = Event::new(1, 2, Op::Notify);
    m.slots[0].store(good.encode(0), Ordering::Relaxed);
    m.slots[1].store(good.encode(0), Ordering::Relaxed); // wrong sequence
    m.slots[2].store(good.encode(2) ^ (1 << 3), Ordering::Relaxed); // torn
    let body = 9u64 << 24 | 2 << 44;
    m.slots[3].store(
        body | u64::from(record::check_byte(body)) << 56,
        Ordering::Relaxed,
    );
    m.slots[4].store(good.encode(4), Ordering::Relaxed);
    let (events, rejections) = drain(&mut c, &ring);
    assert_eq!(events, [good, good]);
    let reasons: Vec<_> = rejections.iter().map(|r| (r.position, r.reason)).collect();
    assert_eq!(
        reasons,
        [
            (
                1,
                RejectReason::WrongSequence {
                    expected: 1,
                    found: 0
                }
            ),
            (2, RejectReason::BadCheck),
            (3, RejectReason::UnknownOp(9)),
        ]
    );
    assert_eq!(c.position(), 5);
    // Garbage summary bits past the set and stray word bits are harmless.
    m.header.overflow_summary.store(u64::MAX, Ordering::Relaxed);
    m.header.overflow[OVERFLOW_WORDS - 1].store(1 << 63, Ordering::Relaxed);
    let set = pending(&mut c, &ring);
    assert_eq!(set.into_iter().collect::<Vec<_>>(), [(255, 0, 0, true)]);
}

#[test]
fn ring_over_raw_range_memory() {
    #[repr(C, align(4096))]
    struct Range([u8; 3 * 4096]);
    let mut range = Range([0; 3 * 4096]);
    let d = Designation::standard(SourceType::GuestVcpu, ANY_SOURCE, 0, 0x10_0000, 512, 0);
    let layout = d.ring_layout().unwrap();
    assert_eq!(d.range_len, 3 * 4096);
    let base = range.0.as_mut_ptr();
    // SAFETY: the whole range is a live local buffer used only through the rings.
    let guest = unsafe { Ring::from_range(base, &layout) }.unwrap();
    // SAFETY: as above.
    let host = unsafe { Ring::from_range(base, &layout) }.unwrap();
    let mut c = Consumer::new();
    c.reset(&host);
    let e = Event::new(4, 1, Op::RxRefill);
    assert_eq!(guest.send(e).via, Via::Ring(0));
    assert_eq!(c.poll(&host), Polled::Event(e));
    // Host-visible bytes: head in the protected page at offset 0, tail at 4096.
    assert_eq!(range.0[0], 1);
    assert_eq!(range.0[4096], 1);
    // SAFETY: as above; misaligned on purpose.
    let bad = unsafe { Ring::from_range(base.wrapping_add(8), &layout) };
    assert_eq!(bad.err(), Some(RingError::Misaligned));
}

proptest! {
    /// Whatever the guest leaves in the ring and overflow words — and whatever it
    /// does to them between polls — the consumer never panics, each call is bounded,
    /// and accepted events are well-formed records for their positions.
    #[test]
    fn consumer_survives_arbitrary_memory(
        slots in prop::collection::vec(any::<u64>(), 8),
        summary: u64,
        words in prop::collection::vec(any::<u64>(), OVERFLOW_WORDS),
        scribbles in prop::collection::vec((0usize..8, any::<u64>()), 0..32),
        start in any::<u64>(),
    ) {
        let m = Mem::new(8);
        for (s, v) in m.slots.iter().zip(&slots) {
            s.store(*v, Ordering::Relaxed);
        }
        m.header.overflow_summary.store(summary, Ordering::Relaxed);
        for (w, v) in m.header.overflow.iter().zip(&words) {
            w.store(*v, Ordering::Relaxed);
        }
        let ring = m.ring();
        let mut c = Consumer { position: start };
        for (i, v) in scribbles {
            let before = c.position();
            match c.poll(&ring) {
                Polled::Event(e) => prop_assert!(record::decode(e.encode(before)).is_ok()),
                Polled::Rejected(r) => prop_assert_eq!(r.position, before),
                Polled::Empty => prop_assert_eq!(c.position(), before),
            }
            m.slots[i].store(v, Ordering::Relaxed);
            let n = c.drain_overflow(&ring, |_| {});
            prop_assert!(n <= OVERFLOW_WORDS * 64);
            let _ = c.has_work(&ring);
        }
        // At most one lap of non-empty slots before an empty one (each poll clears).
        let mut polls = 0;
        while c.poll(&ring) != Polled::Empty {
            polls += 1;
            prop_assert!(polls <= 8);
        }
    }

    /// Random operation sequences on one thread: every event is delivered exactly
    /// once through the ring or is pending in the overflow set.
    #[test]
    fn sequential_sends_are_never_lost(
        capacity_log in 1u32..5,
        ops in prop::collection::vec(prop_oneof![
            (0u8..20, 0u16..20).prop_map(Some),
            Just(None),
        ], 1..200),
    ) {
        let m = Mem::new(1 << capacity_log);
        let ring = m.ring();
        let mut c = Consumer::new();
        let mut expected_ring = Vec::new();
        let mut got_ring = Vec::new();
        let mut overflowed = BTreeSet::new();
        let mut drained = BTreeSet::new();
        for op in ops {
            if let Some((device, queue)) = op {
                let e = Event::new(device, queue, Op::Notify);
                match ring.send(e).via {
                    Via::Ring(_) => expected_ring.push(e),
                    Via::Overflow => {
                        overflowed.insert(pending_at_event(e));
                    }
                }
            } else {
                let (events, rejections) = drain(&mut c, &ring);
                prop_assert!(rejections.is_empty());
                got_ring.extend(events);
                drained.extend(pending(&mut c, &ring));
            }
        }
        got_ring.extend(drain(&mut c, &ring).0);
        drained.extend(pending(&mut c, &ring));
        prop_assert_eq!(got_ring, expected_ring);
        prop_assert!(overflowed.is_subset(&drained));
        prop_assert!(drained.is_subset(&overflowed));
    }
}

fn pending_at_event(e: Event) -> (u8, u16, u8, bool) {
    let (w, b) = overflow_position(&e);
    match pending_at(w, b).unwrap() {
        Pending::Event(e) => (e.device, e.queue, e.op as u8, false),
        Pending::Device(d) => (d, 0, 0, true),
    }
}
