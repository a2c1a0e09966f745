//! The guest's receiver of a direct channel (`para_abi::direct::Receiver`)
//! against a peer that writes anything: producer indexes that jump or run
//! backwards, slot lengths of any value, rewritten while being read, and the
//! receiver's own control words rewritten between calls.
//!
//! Input: 6-byte operations: kind, then a u32 and a byte.
#![no_main]

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use para_abi::direct::{Ctrl, Receiver, SLOT_DATA, SLOTS, Slots};

/// The peer's slots: a length word per slot and its data, all peer-written.
struct PeerSlots {
    lens: RefCell<Vec<u32>>,
}

impl Slots for &PeerSlots {
    fn put(&self, index: u32, frame: &[u8]) {
        self.lens.borrow_mut()[(index % SLOTS) as usize] = frame.len() as u32;
    }
    fn len(&self, index: u32) -> u32 {
        self.lens.borrow()[(index % SLOTS) as usize]
    }
    fn get(&self, index: u32, out: &mut [u8]) {
        assert!(
            out.len() <= SLOT_DATA,
            "copy of {} bytes from a slot",
            out.len()
        );
        out.fill(index as u8);
    }
}

fuzz_target!(|data: &[u8]| {
    let (mine, peer) = (Ctrl::new(), Ctrl::new());
    let slots = PeerSlots {
        lens: RefCell::new(vec![64; SLOTS as usize]),
    };
    let mut rx = Receiver::new(&mine, &peer, &slots);
    let mut out = vec![0u8; 1514];
    for op in data.chunks_exact(6).take(1024) {
        let v = u32::from_le_bytes([op[1], op[2], op[3], op[4]]);
        match op[0] % 7 {
            0 => peer.produced.0.store(v, Ordering::Release),
            1 => {
                peer.produced
                    .0
                    .fetch_add(u32::from(op[5]), Ordering::Release);
            }
            2 => slots.lens.borrow_mut()[usize::from(op[5])] = v,
            3 => {
                let before = mine.consumed.0.load(Ordering::Relaxed);
                if let Ok(Some(n)) = rx.recv(&mut out[..usize::from(op[5]) * 5]) {
                    assert!(n <= usize::from(op[5]) * 5 && n <= SLOT_DATA);
                }
                let after = mine.consumed.0.load(Ordering::Relaxed);
                let produced = peer.produced.0.load(Ordering::Relaxed);
                assert!(
                    after == before || after == before.wrapping_add(1) || after == produced,
                    "consumer moved from {before} to {after}"
                );
            }
            4 => {
                if rx.prepare_sleep() {
                    rx.wake();
                }
            }
            5 => {
                if let Ok(n) = rx.pending() {
                    assert!(n <= SLOTS);
                }
                let _ = rx.waiting();
            }
            // The guest's own page is its own to scribble on, too.
            _ => mine.sleep.0.store(v, Ordering::Relaxed),
        }
    }
    let _ = rx.stats();
});
