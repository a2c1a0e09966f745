//! Model check of the sleep handshake: every interleaving of a sender's
//! publish-then-check and a receiver's announce-then-check.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p para-abi --release --lib direct`.

use loom::sync::Arc;
use loom::sync::atomic::AtomicU32;
use loom::thread;

use super::*;

/// Slots holding one 4-byte word each, as loom atomics.
#[derive(Clone)]
struct WordSlots(Arc<[(AtomicU32, AtomicU32); 2]>);

impl Slots for WordSlots {
    fn put(&self, index: u32, frame: &[u8]) {
        let mut w = [0u8; 4];
        w[..frame.len().min(4)].copy_from_slice(&frame[..frame.len().min(4)]);
        let s = &self.0[(index % 2) as usize];
        s.1.store(u32::from_le_bytes(w), Ordering::Relaxed);
        s.0.store(frame.len().min(4) as u32, Ordering::Relaxed);
    }
    fn len(&self, index: u32) -> u32 {
        self.0[(index % 2) as usize].0.load(Ordering::Relaxed)
    }
    fn get(&self, index: u32, out: &mut [u8]) {
        let w = self.0[(index % 2) as usize]
            .1
            .load(Ordering::Relaxed)
            .to_le_bytes();
        let n = out.len().min(4);
        out[..n].copy_from_slice(&w[..n]);
    }
}

/// A receiver that decides to sleep is always woken: never both "the ring
/// looked empty, sleep" and "the peer did not sleep, no wake-up needed".
#[test]
fn no_lost_wake_up() {
    loom::model(|| {
        let a = Arc::new(Ctrl::new());
        let b = Arc::new(Ctrl::new());
        let slots = WordSlots(Arc::new([
            (AtomicU32::new(0), AtomicU32::new(0)),
            (AtomicU32::new(0), AtomicU32::new(0)),
        ]));
        let (a2, b2, s2) = (a.clone(), b.clone(), slots.clone());
        let sender = thread::spawn(move || {
            let mut tx = Sender::new(&a2, &b2, s2);
            tx.send(&7u32.to_le_bytes()).unwrap().wake_peer
        });
        let mut rx = Receiver::new(&b, &a, slots);
        let sleeps = rx.prepare_sleep();
        let woken = sender.join().unwrap();
        assert!(!sleeps || woken, "the receiver sleeps and nobody wakes it");
        if !sleeps {
            let mut buf = [0u8; 4];
            assert_eq!(rx.recv(&mut buf), Ok(Some(4)));
            assert_eq!(u32::from_le_bytes(buf), 7);
        }
    });
}
