use std::boxed::Box;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;

/// One endpoint's memory, page-aligned like the VMM maps it.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

struct Endpoint {
    pages: Box<[Page]>,
}

impl Endpoint {
    fn new() -> Self {
        let pages = (0..ENDPOINT_SIZE / 4096).map(|_| Page([0; 4096])).collect();
        Self { pages }
    }
    fn base(&self) -> *mut u8 {
        self.pages.as_ptr().cast::<u8>().cast_mut()
    }
    fn ctrl(&self) -> &Ctrl {
        #[allow(clippy::cast_ptr_alignment)]
        let ctrl = self.base().cast::<Ctrl>();
        // SAFETY: the first page is 4 KiB-aligned, zeroed (a valid fresh Ctrl)
        // and lives as long as `self`.
        unsafe { &*ctrl }
    }
    fn slots(&self) -> RawSlots {
        // SAFETY: ENDPOINT_SIZE page-aligned bytes owned by `self`.
        unsafe { RawSlots::new(self.base()) }
    }
}

/// A and B, each with its endpoint.
fn pair() -> (Endpoint, Endpoint) {
    (Endpoint::new(), Endpoint::new())
}

fn frame(seq: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

#[test]
fn frames_cross_in_order_across_many_wraps() {
    let (a, b) = pair();
    let mut tx = Sender::new(a.ctrl(), b.ctrl(), a.slots());
    let mut rx = Receiver::new(b.ctrl(), a.ctrl(), a.slots());
    let mut buf = vec![0u8; SLOT_DATA];
    for seq in 0..(SLOTS * 5 + 7) {
        let len = 1 + (seq as usize * 97) % SLOT_DATA;
        assert_eq!(tx.send(&frame(seq, len)), Ok(Sent { wake_peer: false }));
        assert_eq!(rx.recv(&mut buf), Ok(Some(len)));
        assert_eq!(&buf[..len], &frame(seq, len)[..]);
    }
    assert_eq!(rx.recv(&mut buf), Ok(None));
    assert_eq!(rx.stats(), RecvStats::default());
}

#[test]
fn a_full_ring_refuses_until_the_receiver_consumes() {
    let (a, b) = pair();
    let mut tx = Sender::new(a.ctrl(), b.ctrl(), a.slots());
    let mut rx = Receiver::new(b.ctrl(), a.ctrl(), a.slots());
    for seq in 0..SLOTS {
        tx.send(&frame(seq, 60)).unwrap();
    }
    assert_eq!(tx.space(), Ok(0));
    assert_eq!(tx.send(&frame(0, 60)), Err(SendError::Full));
    let mut buf = [0u8; 64];
    assert_eq!(rx.recv(&mut buf), Ok(Some(60)));
    assert_eq!(&buf[..60], &frame(0, 60)[..]);
    assert_eq!(tx.space(), Ok(1));
    tx.send(&frame(SLOTS, 60)).unwrap();
}

#[test]
fn bad_lengths_are_refused_on_both_sides() {
    let (a, b) = pair();
    let mut tx = Sender::new(a.ctrl(), b.ctrl(), a.slots());
    assert_eq!(tx.send(&[]), Err(SendError::BadLength(0)));
    assert_eq!(
        tx.send(&vec![0; SLOT_DATA + 1]),
        Err(SendError::BadLength(SLOT_DATA + 1))
    );

    // A hostile A writes lengths of its own choosing into its slots.
    let mut rx = Receiver::new(b.ctrl(), a.ctrl(), a.slots());
    let raw = a.slots();
    for (i, len) in [0u32, SLOT_DATA as u32 + 1, u32::MAX, 100]
        .into_iter()
        .enumerate()
    {
        raw.with_len(i as u32, |w| w.store(len, Ordering::Relaxed));
    }
    a.ctrl().produced.0.store(4, Ordering::Release);
    let mut small = [0u8; 50];
    assert_eq!(rx.recv(&mut small), Err(RecvError::BadLength(0)));
    assert_eq!(
        rx.recv(&mut small),
        Err(RecvError::BadLength(SLOT_DATA as u32 + 1))
    );
    assert_eq!(rx.recv(&mut small), Err(RecvError::BadLength(u32::MAX)));
    assert_eq!(rx.recv(&mut small), Err(RecvError::TooLong(100)));
    assert_eq!(rx.recv(&mut small), Ok(None));
    assert_eq!(
        rx.stats(),
        RecvStats {
            bad_length: 3,
            too_long: 1,
            corrupt: 0
        }
    );
}

#[test]
fn an_impossible_producer_index_is_skipped_and_counted() {
    let (a, b) = pair();
    let mut rx = Receiver::new(b.ctrl(), a.ctrl(), a.slots());
    a.ctrl().produced.0.store(SLOTS + 1, Ordering::Release);
    let mut buf = [0u8; 64];
    assert_eq!(rx.recv(&mut buf), Err(RecvError::PeerCorrupt));
    assert_eq!(rx.stats().corrupt, 1);
    // Resumed from the peer's index: a sane peer's next frame arrives.
    let mut tx = Sender::new(a.ctrl(), b.ctrl(), a.slots());
    tx.send(&frame(9, 10)).unwrap();
    assert_eq!(rx.recv(&mut buf), Ok(Some(10)));
    // Going backwards is impossible too.
    a.ctrl().produced.0.store(3, Ordering::Release);
    assert_eq!(rx.pending(), Err(RecvError::PeerCorrupt));
}

#[test]
fn an_impossible_consumer_index_stops_the_sender_only() {
    let (a, b) = pair();
    let mut tx = Sender::new(a.ctrl(), b.ctrl(), a.slots());
    b.ctrl().consumed.0.store(7, Ordering::Release);
    assert_eq!(tx.send(&frame(0, 10)), Err(SendError::PeerCorrupt));
    b.ctrl().consumed.0.store(0, Ordering::Release);
    assert!(tx.send(&frame(0, 10)).is_ok());
}

#[test]
fn a_sleeping_receiver_is_woken_once_per_sleep() {
    let (a, b) = pair();
    let mut tx = Sender::new(a.ctrl(), b.ctrl(), a.slots());
    let mut rx = Receiver::new(b.ctrl(), a.ctrl(), a.slots());
    let mut buf = [0u8; 64];
    assert!(rx.prepare_sleep());
    assert_eq!(tx.send(&frame(0, 8)), Ok(Sent { wake_peer: true }));
    assert_eq!(
        tx.send(&frame(1, 8)),
        Ok(Sent { wake_peer: false }),
        "one request per sleep"
    );
    rx.wake();
    assert_eq!(rx.recv(&mut buf), Ok(Some(8)));
    // Frames waiting: the sleep is withdrawn and nobody needs waking.
    assert!(!rx.prepare_sleep());
    assert_eq!(tx.send(&frame(2, 8)), Ok(Sent { wake_peer: false }));
    while rx.recv(&mut buf).unwrap().is_some() {}
    assert!(rx.prepare_sleep());
    assert_eq!(
        tx.send(&frame(3, 8)),
        Ok(Sent { wake_peer: true }),
        "a new sleep is woken again"
    );
}

#[test]
fn two_threads_ping_pong_without_loss() {
    const ROUNDS: u32 = 20_000;
    let (a, b) = pair();
    let (a, b) = (&a, &b);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut tx = Sender::new(a.ctrl(), b.ctrl(), a.slots());
            let mut rx = Receiver::new(a.ctrl(), b.ctrl(), b.slots());
            let mut buf = [0u8; 64];
            for seq in 0..ROUNDS {
                while tx.send(&seq.to_le_bytes()).is_err() {}
                let n = loop {
                    if let Some(n) = rx.recv(&mut buf).unwrap() {
                        break n;
                    }
                    core::hint::spin_loop();
                };
                assert_eq!(&buf[..n], &(seq ^ 0xFFFF).to_le_bytes());
            }
        });
        s.spawn(move || {
            let mut tx = Sender::new(b.ctrl(), a.ctrl(), b.slots());
            let mut rx = Receiver::new(b.ctrl(), a.ctrl(), a.slots());
            let mut buf = [0u8; 64];
            for seq in 0..ROUNDS {
                let n = loop {
                    if let Some(n) = rx.recv(&mut buf).unwrap() {
                        break n;
                    }
                    core::hint::spin_loop();
                };
                assert_eq!(&buf[..n], &seq.to_le_bytes());
                while tx.send(&(seq ^ 0xFFFF).to_le_bytes()).is_err() {}
            }
        });
    });
}

proptest! {
    /// Whatever a hostile peer writes into its own endpoint (indices, lengths,
    /// bytes), the receiver never panics, never returns more than the slot
    /// holds, and never moves more than SLOTS ahead of what it saw.
    #[test]
    fn a_hostile_peer_cannot_upset_the_receiver(
        writes in proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u32>()), 1..64)
    ) {
        let (a, b) = pair();
        let mut rx = Receiver::new(b.ctrl(), a.ctrl(), a.slots());
        let raw = a.slots();
        let mut buf = vec![0u8; SLOT_DATA];
        for (produced, slot, len) in writes {
            raw.with_len(slot, |w| w.store(len, Ordering::Relaxed));
            a.ctrl().produced.0.store(produced, Ordering::Release);
            for _ in 0..4 {
                if let Ok(Some(n)) = rx.recv(&mut buf) {
                    prop_assert!((1..=SLOT_DATA).contains(&n));
                }
                let consumed = b.ctrl().consumed.0.load(Ordering::Relaxed);
                prop_assert!(in_flight(a.ctrl().produced.0.load(Ordering::Relaxed), consumed).is_some());
            }
        }
    }
}
