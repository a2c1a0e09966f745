//! The doorbell path (M1) end to end over one page-aligned buffer of fuzzer
//! bytes: the guest's reading of the para region's header and designation
//! table (`Region::open`, `Region::snapshot`, `Designation::ring_layout`),
//! then, for each designation that validates and fits, the host's consumer
//! (`Consumer::poll`, `drain_overflow`, `has_work`, `park`) on ring slots,
//! header and status the guest writes.
#![no_main]

use std::alloc::{Layout, alloc_zeroed, dealloc};

use libfuzzer_sys::fuzz_target;
use para_abi::doorbell::{Consumer, Polled, Ring};
use para_abi::region::{CONTROL_SIZE, Region, TABLE_CAPACITY};

/// The range every designation is read against: 64 KiB.
const RANGE: usize = 0x1_0000;

/// A zeroed, page-aligned buffer, freed on drop.
struct Buffer(*mut u8);

impl Buffer {
    fn layout() -> Layout {
        Layout::from_size_align(RANGE, 4096).expect("valid layout")
    }
    fn new(bytes: &[u8]) -> Self {
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(Self::layout()) };
        assert!(!p.is_null(), "allocation");
        let n = bytes.len().min(RANGE);
        // SAFETY: `p` holds RANGE bytes; `n` <= RANGE.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n) };
        Self(p)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.0, Self::layout()) };
    }
}

fuzz_target!(|data: &[u8]| {
    let buf = Buffer::new(data);
    // SAFETY: RANGE >= CONTROL_SIZE bytes, 4 KiB-aligned, alive for the
    // closure, and only ever accessed through atomics from here on.
    let Ok(region) = (unsafe { Region::open(buf.0, CONTROL_SIZE as u64) }) else {
        return;
    };
    let mut table = [None; TABLE_CAPACITY];
    if region.snapshot(&mut table, 4).is_err() {
        return;
    }
    for d in table.iter().flatten() {
        let layout = d
            .ring_layout()
            .expect("snapshot keeps valid designations only");
        let end = layout.slots_offset + u64::from(layout.capacity) * 8;
        assert!(
            end <= d.range_len,
            "a validated ring ends outside its range"
        );
        if d.range_len > RANGE as u64 {
            continue;
        }
        // SAFETY: the layout was validated and lies inside the first
        // `range_len` <= RANGE bytes of `buf` (checked above).
        let Ok(ring) = (unsafe { Ring::from_range(buf.0, &layout) }) else {
            continue;
        };
        let mut consumer = Consumer::new();
        // Twice the capacity: a full lap of records and rejections, each O(1).
        for _ in 0..2 * ring.capacity() {
            match consumer.poll(&ring) {
                Polled::Empty => break,
                Polled::Event(_) | Polled::Rejected(_) => {}
            }
        }
        let drained = consumer.drain_overflow(&ring, |_| {});
        assert!(drained <= 64 * 64, "overflow drain is bounded");
        let _ = consumer.has_work(&ring);
        let _ = consumer.park(&ring);
        consumer.unpark(&ring);
    }
});
