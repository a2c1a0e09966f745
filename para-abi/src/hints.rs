//! M2 interrupt-vCPU hints (after the public description of interrupt-vCPU hints, US9411624): the page at
//! [`area::HINTS`](crate::layout::area::HINTS) where the shim tells the guest which
//! of its vCPUs share a host CPU with the thread that produces a device queue's
//! events, so the guest can point that queue's MSI-X entry there.
//!
//! ```text
//! offset 0    HintsHeader (64 bytes)
//! offset 64   CAPACITY × HintRecord (64 bytes each), one per (device, queue)
//! ```
//!
//! The host is the only writer (the guest maps the page read-only). Each record is
//! its own seqlock: [`HintRecord::generation`] is odd while the host rewrites it and
//! even, and larger, afterwards, so a reader can tell a torn copy from a whole one
//! and a new hint from the one it already acted on.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// `"HINT"` as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"HINT");
/// Layout version of this crate.
pub const VERSION: u32 = 1;
/// Size of [`HintsHeader`].
pub const HEADER_BYTES: usize = 64;
/// Size of one [`HintRecord`].
pub const RECORD_BYTES: usize = 64;
/// The page holding header and records.
pub const PAGE_BYTES: usize = 4096;
/// Records in the page.
pub const CAPACITY: usize = (PAGE_BYTES - HEADER_BYTES) / RECORD_BYTES;
/// Plain MSI addresses reach APIC ids 0–255 (SDM vol 3 §11.11.1), so a hint names
/// ids in that range only.
pub const APIC_IDS: u32 = 256;
/// [`HintRecord::key`] bit saying the record is in use.
pub const KEY_VALID: u32 = 1 << 31;

/// The header at offset 0 of the hints page.
#[repr(C)]
pub struct HintsHeader {
    /// [`MAGIC`].
    pub magic: AtomicU32,
    /// [`VERSION`].
    pub version: AtomicU32,
    /// [`CAPACITY`].
    pub capacity: AtomicU32,
    /// [`RECORD_BYTES`].
    pub record_size: AtomicU32,
    /// Reserved, zero.
    pub reserved: [AtomicU64; 6],
}

/// One device queue's hint.
#[repr(C)]
pub struct HintRecord {
    /// Seqlock and hint generation: 0 = never written, odd = being written.
    pub generation: AtomicU32,
    /// [`key`] of the device queue, or 0 for an unused record.
    pub key: AtomicU32,
    /// The host CPU the queue's events came from (for the guest's log only).
    pub host_cpu: AtomicU32,
    /// Number of APIC ids in `apic_mask`.
    pub count: AtomicU32,
    /// Bit `i` set: the vCPU with APIC id `i` runs on that host CPU.
    pub apic_mask: [AtomicU64; 4],
    /// Reserved, zero.
    pub reserved: [AtomicU64; 2],
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<HintsHeader>() == HEADER_BYTES);
    assert!(size_of::<HintRecord>() == RECORD_BYTES);
    assert!(offset_of!(HintRecord, generation) == 0);
    assert!(offset_of!(HintRecord, key) == 4);
    assert!(offset_of!(HintRecord, host_cpu) == 8);
    assert!(offset_of!(HintRecord, count) == 12);
    assert!(offset_of!(HintRecord, apic_mask) == 16);
    assert!(HEADER_BYTES + CAPACITY * RECORD_BYTES <= PAGE_BYTES);
};

/// The record key of queue `queue` of the PCI device with device number `device`.
#[must_use]
pub const fn key(device: u8, queue: u16) -> u32 {
    KEY_VALID | ((device as u32) << 16) | queue as u32
}

/// (device, queue) of a valid key.
#[must_use]
pub const fn split_key(key: u32) -> Option<(u8, u16)> {
    if key & KEY_VALID == 0 || key & 0x7F00_0000 != 0 {
        return None;
    }
    Some(((key >> 16) as u8, key as u16))
}

/// A set of APIC ids 0–255.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApicSet(pub [u64; 4]);

impl ApicSet {
    /// Adds `id`; false when it is beyond [`APIC_IDS`].
    pub fn insert(&mut self, id: u32) -> bool {
        if id >= APIC_IDS {
            return false;
        }
        self.0[(id / 64) as usize] |= 1 << (id % 64);
        true
    }

    #[must_use]
    pub fn contains(&self, id: u32) -> bool {
        id < APIC_IDS && self.0[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    #[must_use]
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The ids in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..APIC_IDS).filter(|&i| self.contains(i))
    }
}

/// A whole (untorn) copy of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hint {
    pub generation: u32,
    pub key: u32,
    pub host_cpu: u32,
    pub apics: ApicSet,
}

/// Why a record could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Never written.
    Empty,
    /// The host was writing it (odd generation, or it changed while we read): try later.
    Torn,
    /// The copy is whole but inconsistent (count disagrees with the mask): the
    /// writer is not following this protocol.
    Inconsistent,
}

impl HintRecord {
    /// Writes a new hint. The host is the only writer of a record; concurrent
    /// `publish` calls on one record are not allowed (the shim serialises them).
    /// Returns the new (even) generation.
    pub fn publish(&self, key: u32, host_cpu: u32, apics: &ApicSet) -> u32 {
        let g = self.generation.load(Ordering::Relaxed);
        // An odd value left by a writer that died mid-update is closed the same way.
        let open = g | 1;
        self.generation.store(open, Ordering::Relaxed);
        // Readers that see any of the stores below also see the odd generation.
        fence(Ordering::Release);
        self.key.store(key, Ordering::Relaxed);
        self.host_cpu.store(host_cpu, Ordering::Relaxed);
        self.count.store(apics.len(), Ordering::Relaxed);
        for (w, v) in self.apic_mask.iter().zip(apics.0) {
            w.store(v, Ordering::Relaxed);
        }
        let closed = open.wrapping_add(1).max(2);
        self.generation.store(closed, Ordering::Release);
        closed
    }

    /// One attempt at a consistent copy.
    pub fn read(&self) -> Result<Hint, ReadError> {
        let g1 = self.generation.load(Ordering::Acquire);
        if g1 == 0 {
            return Err(ReadError::Empty);
        }
        if g1 & 1 == 1 {
            return Err(ReadError::Torn);
        }
        let key = self.key.load(Ordering::Relaxed);
        let host_cpu = self.host_cpu.load(Ordering::Relaxed);
        let count = self.count.load(Ordering::Relaxed);
        let mut apics = ApicSet::default();
        for (v, w) in apics.0.iter_mut().zip(&self.apic_mask) {
            *v = w.load(Ordering::Relaxed);
        }
        // The data loads above complete before the generation is re-read.
        fence(Ordering::Acquire);
        if self.generation.load(Ordering::Relaxed) != g1 {
            return Err(ReadError::Torn);
        }
        if count != apics.len() {
            return Err(ReadError::Inconsistent);
        }
        Ok(Hint {
            generation: g1,
            key,
            host_cpu,
            apics,
        })
    }
}

/// Why memory is not a hints page this crate understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageError {
    BadMagic(u32),
    BadVersion(u32),
    BadGeometry,
}

/// Views of the hints page.
#[derive(Clone, Copy)]
pub struct Hints<'a> {
    pub header: &'a HintsHeader,
    pub records: &'a [HintRecord; CAPACITY],
}

impl Hints<'_> {
    /// Views of a hints page without checking it (the host, which then calls
    /// [`Hints::init`]).
    ///
    /// # Safety
    /// `base` is 8-byte aligned, points at [`PAGE_BYTES`] bytes that stay mapped
    /// for `'a`, and is only accessed atomically by everyone.
    #[must_use]
    #[allow(clippy::cast_ptr_alignment)] // the alignment is the caller's promise
    pub unsafe fn from_ptr(base: *const u8) -> Self {
        // SAFETY: per the contract; both types are plain atomics, valid for any bits.
        unsafe {
            Self {
                header: &*base.cast::<HintsHeader>(),
                records: &*base.add(HEADER_BYTES).cast::<[HintRecord; CAPACITY]>(),
            }
        }
    }

    /// Views of a hints page the host set up, after checking its header.
    ///
    /// # Safety
    /// As [`Hints::from_ptr`].
    pub unsafe fn open(base: *const u8) -> Result<Self, PageError> {
        // SAFETY: forwarded contract.
        let h = unsafe { Self::from_ptr(base) };
        let magic = h.header.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(PageError::BadMagic(magic));
        }
        let version = h.header.version.load(Ordering::Relaxed);
        if version != VERSION {
            return Err(PageError::BadVersion(version));
        }
        if h.header.capacity.load(Ordering::Relaxed) as usize != CAPACITY
            || h.header.record_size.load(Ordering::Relaxed) as usize != RECORD_BYTES
        {
            return Err(PageError::BadGeometry);
        }
        Ok(h)
    }

    /// Writes the header (host, before the guest starts).
    pub fn init(&self) {
        self.header.version.store(VERSION, Ordering::Relaxed);
        self.header
            .capacity
            .store(CAPACITY as u32, Ordering::Relaxed);
        self.header
            .record_size
            .store(RECORD_BYTES as u32, Ordering::Relaxed);
        self.header.magic.store(MAGIC, Ordering::Release);
    }

    /// The record holding `key`, if the host has written one.
    #[must_use]
    pub fn find(&self, key: u32) -> Option<usize> {
        self.records
            .iter()
            .position(|r| r.key.load(Ordering::Acquire) == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::boxed::Box;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[repr(C, align(64))]
    struct Page([u8; PAGE_BYTES]);

    fn page() -> Box<Page> {
        Box::new(Page([0; PAGE_BYTES]))
    }

    fn set(ids: &[u32]) -> ApicSet {
        let mut s = ApicSet::default();
        for &i in ids {
            s.insert(i);
        }
        s
    }

    #[test]
    fn unwritten_records_are_empty_and_odd_ones_torn() {
        let p = page();
        // SAFETY: a page-sized, aligned buffer that outlives the views.
        let h = unsafe { Hints::from_ptr(p.0.as_ptr()) };
        assert_eq!(h.records[0].read(), Err(ReadError::Empty));
        h.records[0].generation.store(3, Ordering::Relaxed);
        assert_eq!(h.records[0].read(), Err(ReadError::Torn));
        // A writer that died mid-update: the next publish closes the record.
        let g = h.records[0].publish(key(3, 0), 1, &set(&[1]));
        assert_eq!(g, 4);
        assert_eq!(h.records[0].read().unwrap().generation, 4);
    }

    #[test]
    fn open_checks_the_header() {
        let p = page();
        // SAFETY: as above.
        let open = || unsafe { Hints::open(p.0.as_ptr()) }.err();
        assert_eq!(open(), Some(PageError::BadMagic(0)));
        // SAFETY: as above.
        let h = unsafe { Hints::from_ptr(p.0.as_ptr()) };
        h.init();
        assert_eq!(open(), None);
        h.header.record_size.store(32, Ordering::Relaxed);
        assert_eq!(open(), Some(PageError::BadGeometry));
    }

    #[test]
    fn a_count_that_disagrees_with_the_mask_is_refused() {
        let p = page();
        // SAFETY: as above.
        let h = unsafe { Hints::from_ptr(p.0.as_ptr()) };
        h.records[1].publish(key(3, 0), 0, &set(&[0, 1]));
        h.records[1].count.store(7, Ordering::Relaxed);
        assert_eq!(h.records[1].read(), Err(ReadError::Inconsistent));
    }

    /// A reader racing a writer never takes a torn copy for a whole one: every
    /// record the writer publishes has mask = {host_cpu}, so a mixed copy shows.
    #[test]
    fn concurrent_reads_see_whole_records_or_torn() {
        const PUBLISHES: u32 = 50_000;
        let p: Arc<Page> = Arc::from(page());
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (p, done) = (p.clone(), done.clone());
            std::thread::spawn(move || {
                // SAFETY: as above; `p` lives as long as the thread.
                let h = unsafe { Hints::from_ptr(p.0.as_ptr()) };
                for i in 0..PUBLISHES {
                    let cpu = i % 200;
                    h.records[0].publish(key(1, 0), cpu, &set(&[cpu]));
                }
                done.store(true, Ordering::Release);
            })
        };
        // SAFETY: as above.
        let h = unsafe { Hints::from_ptr(p.0.as_ptr()) };
        let mut last = 0;
        let check = |hint: Hint, last: &mut u32| {
            assert_eq!(
                hint.apics,
                set(&[hint.host_cpu]),
                "torn copy taken as whole"
            );
            assert!(hint.generation >= *last, "generation went backwards");
            *last = hint.generation;
        };
        while !done.load(Ordering::Acquire) {
            match h.records[0].read() {
                Ok(hint) => check(hint, &mut last),
                Err(ReadError::Torn | ReadError::Empty) => {}
                Err(ReadError::Inconsistent) => panic!("count and mask disagree"),
            }
        }
        writer.join().unwrap();
        let hint = h.records[0].read().expect("whole once the writer is done");
        check(hint, &mut last);
        assert_eq!(hint.generation, 2 * PUBLISHES);
    }

    proptest! {
        #[test]
        fn published_hints_read_back(
            device in 0u8..32,
            queue in any::<u16>(),
            host_cpu in any::<u32>(),
            ids in proptest::collection::vec(0u32..300, 0..20),
            rewrites in 1usize..5,
        ) {
            let p = page();
            // SAFETY: as above.
            let h = unsafe { Hints::from_ptr(p.0.as_ptr()) };
            h.init();
            let s = set(&ids);
            let mut g = 0;
            for _ in 0..rewrites {
                let ng = h.records[5].publish(key(device, queue), host_cpu, &s);
                prop_assert!(ng > g && ng % 2 == 0);
                g = ng;
            }
            let hint = h.records[5].read().unwrap();
            prop_assert_eq!(hint.generation, g);
            prop_assert_eq!(split_key(hint.key), Some((device, queue)));
            prop_assert_eq!(hint.host_cpu, host_cpu);
            prop_assert_eq!(hint.apics, s);
            let want: std::vec::Vec<u32> = {
                let mut v: std::vec::Vec<u32> = ids.iter().copied().filter(|&i| i < APIC_IDS).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            prop_assert_eq!(hint.apics.iter().collect::<std::vec::Vec<_>>(), want);
            prop_assert_eq!(h.find(key(device, queue)), Some(5));
        }

        #[test]
        fn any_odd_generation_reads_torn(g in any::<u32>(), junk in any::<[u64; 4]>()) {
            let p = page();
            // SAFETY: as above.
            let h = unsafe { Hints::from_ptr(p.0.as_ptr()) };
            h.records[0].generation.store(g | 1, Ordering::Relaxed);
            for (w, v) in h.records[0].apic_mask.iter().zip(junk) {
                w.store(v, Ordering::Relaxed);
            }
            prop_assert_eq!(h.records[0].read(), Err(ReadError::Torn));
        }

        #[test]
        fn keys_split_back(device in any::<u8>(), queue in any::<u16>(), raw in any::<u32>()) {
            prop_assert_eq!(split_key(key(device, queue)), Some((device, queue)));
            if raw & KEY_VALID == 0 {
                prop_assert_eq!(split_key(raw), None);
            }
        }
    }
}
