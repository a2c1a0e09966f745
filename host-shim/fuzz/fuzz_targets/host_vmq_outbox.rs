//! The VM-queue outbox (M5) as the manager reads it: two guests on plain
//! memfd memory (no KVM); the first guest's outbox entries, its producer and
//! consumer words and the second guest's inbox consumer word are fuzzer
//! bytes; the manager drains both outboxes, copying or remapping pages
//! between the two guests. Covers `vmq::Message::decode`/`check` and every
//! refusal of `Manager::drain`.
//!
//! Input: 12 bytes of counters (sender produced, sender consumed, receiver
//! inbox consumed), a byte of drain rounds, then up to 64 outbox entries.
#![no_main]

use std::sync::atomic::{AtomicU32, Ordering};

use host_shim::kvm::memory;
use host_shim::mech::vmq::manager::Manager;
use host_shim::mech::vmq::{Area, endpoint_memory};
use libfuzzer_sys::fuzz_target;
use para_abi::vmq::{self, ENTRY_SIZE, RING_CONSUMED, RING_ENTRIES, RING_PRODUCED};

const RAM: u64 = 4 << 20;

/// The u32 at `off` of an area that `keeper` keeps mapped.
fn word(_keeper: &Manager, area: usize, off: u64) -> &AtomicU32 {
    // SAFETY: the manager keeps the area mapped as long as it lives, and the
    // reference lives no longer; `off` is one of the 4-aligned counter offsets
    // of the area's first page.
    unsafe { &*((area + off as usize) as *const AtomicU32) }
}

fuzz_target!(|data: &[u8]| {
    let Some((head, entries)) = data.split_first_chunk::<13>() else {
        return;
    };
    let m = Manager::new();
    let mut areas = Vec::new();
    for name in ["fuzz-a", "fuzz-b"] {
        let Ok(ram) = memory::create(name, RAM) else {
            return;
        };
        let Ok(area) = Area::new(name) else { return };
        areas.push(area.base());
        let Ok(mem) = endpoint_memory(&ram, area) else {
            return;
        };
        if m.add(name, mem, Box::new(|| {})).is_err() {
            return;
        }
    }
    let (a, b) = (areas[0], areas[1]);
    for (k, chunk) in entries
        .chunks_exact(ENTRY_SIZE)
        .take(RING_ENTRIES as usize)
        .enumerate()
    {
        let off = vmq::OUTBOX + vmq::entry_offset(k as u32);
        // SAFETY: an entry of the sender's outbox, inside its mapped area.
        unsafe {
            std::ptr::copy_nonoverlapping(
                chunk.as_ptr(),
                (a + off as usize) as *mut u8,
                ENTRY_SIZE,
            );
        }
    }
    let counter = |i: usize| u32::from_le_bytes(head[4 * i..4 * i + 4].try_into().unwrap());
    word(&m, a, vmq::OUTBOX + RING_CONSUMED).store(counter(1), Ordering::Relaxed);
    word(&m, a, vmq::OUTBOX + RING_PRODUCED).store(counter(0), Ordering::Release);
    word(&m, b, vmq::INBOX + RING_CONSUMED).store(counter(2), Ordering::Release);
    for _ in 0..=(head[12] % 4) {
        let d = m.drain(0);
        assert!(
            d.delivered + d.failed <= RING_ENTRIES,
            "one drain handled more than an outbox holds"
        );
        let _ = m.drain(1);
        // The receiver consumes everything, as a guest would.
        let p = word(&m, b, vmq::INBOX + RING_PRODUCED).load(Ordering::Acquire);
        word(&m, b, vmq::INBOX + RING_CONSUMED).store(p, Ordering::Release);
    }
    m.mark_exited(1);
    let _ = m.drain(0);
});
