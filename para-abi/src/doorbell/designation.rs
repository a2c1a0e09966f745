//! Designated ranges: what the shim's memory instruction manager publishes and the
//! guest's event source manager stores.
//!
//! A *designation* (reference text: "memory designation notification") tells the
//! guest: this guest-physical range may be written to deliver events to this host
//! CPU; it is meant for this source type; its first `protected_len` bytes are the
//! protected portion (read-only to the guest, written by the host) where the ring's
//! [`RingStatus`](super::ring::RingStatus) lives; the ring's producer words and
//! slots follow in the writable part; and when the monitor is parked, a write to
//! `kick_gpa` wakes it.
//!
//! ```text
//! range_gpa                                                    range_gpa + range_len
//! | protected portion (RO to guest)  | writable portion                            |
//! | RingStatus @ status_offset  ...  | RingHeader @ ring_offset | slots[capacity] |
//! ```
//!
//! A range for another source type ([`SourceType::HostCpu`],
//! [`SourceType::Device`]: other host threads waking the same monitor) is
//! protected whole ([`Designation::host_written`]): its ring lies in the
//! protected portion, written by the host only, and it has no kick address
//! (host producers wake the monitor themselves). The guest sees it in the
//! table and cannot write it.
//!
//! The table in the para region holds [`DesignationSlot`]s, each a small seqlock:
//! the host bumps the entry generation to odd, rewrites the fields, bumps it to
//! even; a reader that sees an odd generation or a different one after reading
//! knows its copy is torn and retries.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

pub use super::geometry::RingLayout;
use super::geometry::{HEADER_SIZE, MAX_CAPACITY, SLOT_SIZE, STATUS_SIZE};

/// Page size ranges and protected portions are aligned to (a memslot granule).
pub const PAGE_SIZE: u64 = 4096;

/// Which kind of event source a range is reserved for (reference text, FIG. 3:
/// "a first memory range may be designated for use by one or more VCPUs, a second
/// ... by one or more physical CPUs, a third ... by one or more devices").
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceType {
    /// The guest's vCPUs (the doorbell of M1).
    GuestVcpu = 1,
    /// Host CPUs (other host threads waking this monitor).
    HostCpu = 2,
    /// Devices (e.g. a VM queue's deliveries).
    Device = 3,
}

impl SourceType {
    /// Decodes the source-type word; `None` for a free entry (0) or unknown values.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::GuestVcpu),
            2 => Some(Self::HostCpu),
            3 => Some(Self::Device),
            _ => None,
        }
    }
}

/// `source_id` meaning "any source of the type" (e.g. any vCPU).
pub const ANY_SOURCE: u32 = u32::MAX;

/// One designation, as plain values (each side's private copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Designation {
    /// The kind of source the range is for.
    pub source: SourceType,
    /// Which source of that type (vCPU index, ...), or [`ANY_SOURCE`].
    pub source_id: u32,
    /// The host CPU whose monitor consumes this range.
    pub host_cpu: u32,
    /// Guest-physical start, page aligned.
    pub range_gpa: u64,
    /// Length in bytes, a page multiple.
    pub range_len: u64,
    /// Bytes at the start of the range that the guest cannot write, a page multiple.
    pub protected_len: u32,
    /// Offset of the ring's status words, inside the protected portion.
    pub status_offset: u32,
    /// Offset of the ring's header, inside the writable portion (inside the
    /// protected one for host-written ranges); slots follow it.
    pub ring_offset: u32,
    /// Slots in the ring (a power of two, at most [`MAX_CAPACITY`]).
    pub ring_capacity: u32,
    /// Guest-physical address of the trapping kick (a 4-byte MMIO write, any
    /// value); 0 for host-written ranges, which have none.
    pub kick_gpa: u64,
}

/// Why a designation is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DesignationError {
    /// Range start or length not page aligned, empty, or wrapping the address space.
    BadRange,
    /// Protected portion not a page multiple or longer than the range.
    BadProtectedLen,
    /// Status words misaligned or not inside the protected portion.
    BadStatusOffset,
    /// Ring header or slots misaligned, past the end, or on the wrong side of
    /// the protected portion (a vCPU range's ring outside it, any other's
    /// inside it, clear of the status words).
    BadRingOffset,
    /// Capacity not a power of two in `2..=MAX_CAPACITY`.
    BadCapacity,
}

impl Designation {
    /// The standard layout for a ring of `capacity` slots at `range_gpa`: one
    /// protected page holding the status at offset 0, the header at the start of the
    /// second page, slots after it, the length rounded up to whole pages.
    #[must_use]
    pub const fn standard(
        source: SourceType,
        source_id: u32,
        host_cpu: u32,
        range_gpa: u64,
        capacity: u32,
        kick_gpa: u64,
    ) -> Self {
        let end = PAGE_SIZE + HEADER_SIZE as u64 + capacity as u64 * SLOT_SIZE as u64;
        Self {
            source,
            source_id,
            host_cpu,
            range_gpa,
            range_len: end.div_ceil(PAGE_SIZE) * PAGE_SIZE,
            protected_len: PAGE_SIZE as u32,
            status_offset: 0,
            ring_offset: PAGE_SIZE as u32,
            ring_capacity: capacity,
            kick_gpa,
        }
    }

    /// A range for host-side producers of source type `source` (not
    /// [`SourceType::GuestVcpu`]): status at offset 0, the ring's header right
    /// after it, slots after that, the whole range protected (the guest may
    /// read it, never write it), no kick address (`kick_gpa` 0).
    #[must_use]
    pub const fn host_written(
        source: SourceType,
        source_id: u32,
        host_cpu: u32,
        range_gpa: u64,
        capacity: u32,
    ) -> Self {
        let header = STATUS_SIZE as u64;
        let end = header + HEADER_SIZE as u64 + capacity as u64 * SLOT_SIZE as u64;
        let len = end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        Self {
            source,
            source_id,
            host_cpu,
            range_gpa,
            range_len: len,
            protected_len: len as u32,
            status_offset: 0,
            ring_offset: header as u32,
            ring_capacity: capacity,
            kick_gpa: 0,
        }
    }

    /// Whether guests write this range's ring (vCPU ranges) or only the host
    /// does (every other source type: the ring lies in the protected portion).
    #[must_use]
    pub const fn guest_writes(&self) -> bool {
        matches!(self.source, SourceType::GuestVcpu)
    }

    /// Validates the designation and returns where its ring lies.
    pub const fn ring_layout(&self) -> Result<RingLayout, DesignationError> {
        let Some(_) = self.range_gpa.checked_add(self.range_len) else {
            return Err(DesignationError::BadRange);
        };
        if !self.range_gpa.is_multiple_of(PAGE_SIZE)
            || self.range_len == 0
            || !self.range_len.is_multiple_of(PAGE_SIZE)
        {
            return Err(DesignationError::BadRange);
        }
        let protected = self.protected_len as u64;
        if !protected.is_multiple_of(PAGE_SIZE) || protected > self.range_len {
            return Err(DesignationError::BadProtectedLen);
        }
        let status = self.status_offset as u64;
        if !status.is_multiple_of(64) || status + STATUS_SIZE as u64 > protected {
            return Err(DesignationError::BadStatusOffset);
        }
        let capacity = self.ring_capacity;
        if !capacity.is_power_of_two() || capacity < 2 || capacity > MAX_CAPACITY {
            return Err(DesignationError::BadCapacity);
        }
        let header = self.ring_offset as u64;
        let slots = header + HEADER_SIZE as u64;
        let end = slots + capacity as u64 * SLOT_SIZE as u64;
        // A vCPU range's ring is in the writable portion; a host-written one
        // lies inside the protected portion, clear of the status words.
        let placed = if self.guest_writes() {
            header >= protected
        } else {
            end <= protected && (header >= status + STATUS_SIZE as u64 || end <= status)
        };
        if !header.is_multiple_of(64) || !placed || end > self.range_len {
            return Err(DesignationError::BadRingOffset);
        }
        Ok(RingLayout {
            status_offset: status,
            header_offset: header,
            slots_offset: slots,
            capacity,
        })
    }
}

/// One entry of the designation table in shared memory (host writes, guest reads).
#[repr(C)]
pub struct DesignationSlot {
    /// Seqlock generation: 0 never written, odd while the host rewrites the entry,
    /// even (and changed) once it is stable again.
    pub generation: AtomicU32,
    /// [`SourceType`] as `u32`; 0 = free entry.
    pub source: AtomicU32,
    /// See [`Designation::host_cpu`].
    pub host_cpu: AtomicU32,
    /// See [`Designation::source_id`].
    pub source_id: AtomicU32,
    /// See [`Designation::range_gpa`].
    pub range_gpa: AtomicU64,
    /// See [`Designation::range_len`].
    pub range_len: AtomicU64,
    /// See [`Designation::protected_len`].
    pub protected_len: AtomicU32,
    /// See [`Designation::ring_capacity`].
    pub ring_capacity: AtomicU32,
    /// See [`Designation::status_offset`].
    pub status_offset: AtomicU32,
    /// See [`Designation::ring_offset`].
    pub ring_offset: AtomicU32,
    /// See [`Designation::kick_gpa`].
    pub kick_gpa: AtomicU64,
    /// Reserved, zero.
    pub reserved: AtomicU64,
}

/// Size in bytes of a [`DesignationSlot`].
pub const SLOT_BYTES: usize = 64;

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<DesignationSlot>() == SLOT_BYTES);
    assert!(offset_of!(DesignationSlot, generation) == 0);
    assert!(offset_of!(DesignationSlot, source) == 4);
    assert!(offset_of!(DesignationSlot, host_cpu) == 8);
    assert!(offset_of!(DesignationSlot, source_id) == 12);
    assert!(offset_of!(DesignationSlot, range_gpa) == 16);
    assert!(offset_of!(DesignationSlot, range_len) == 24);
    assert!(offset_of!(DesignationSlot, protected_len) == 32);
    assert!(offset_of!(DesignationSlot, ring_capacity) == 36);
    assert!(offset_of!(DesignationSlot, status_offset) == 40);
    assert!(offset_of!(DesignationSlot, ring_offset) == 44);
    assert!(offset_of!(DesignationSlot, kick_gpa) == 48);
};

/// Why reading a table entry gave no designation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The entry is free.
    Free,
    /// The host was rewriting the entry: retry.
    Torn,
    /// The entry holds an unknown source type.
    BadSource(u32),
}

impl DesignationSlot {
    /// A free entry.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            generation: AtomicU32::new(0),
            source: AtomicU32::new(0),
            host_cpu: AtomicU32::new(0),
            source_id: AtomicU32::new(0),
            range_gpa: AtomicU64::new(0),
            range_len: AtomicU64::new(0),
            protected_len: AtomicU32::new(0),
            ring_capacity: AtomicU32::new(0),
            status_offset: AtomicU32::new(0),
            ring_offset: AtomicU32::new(0),
            kick_gpa: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
        }
    }

    /// Host side (single writer): publishes `d` (or frees the entry with `None`).
    pub fn write(&self, d: Option<&Designation>) {
        let g = self.generation.load(Ordering::Relaxed);
        // Odd: readers that start now, or overlap us, see a torn entry.
        self.generation.store(g | 1, Ordering::Relaxed);
        // Orders the odd generation before the field stores (seqlock writer).
        fence(Ordering::Release);
        let zero = Designation {
            source: SourceType::GuestVcpu,
            source_id: 0,
            host_cpu: 0,
            range_gpa: 0,
            range_len: 0,
            protected_len: 0,
            status_offset: 0,
            ring_offset: 0,
            ring_capacity: 0,
            kick_gpa: 0,
        };
        let v = d.unwrap_or(&zero);
        self.source
            .store(d.map_or(0, |d| d.source as u32), Ordering::Relaxed);
        self.host_cpu.store(v.host_cpu, Ordering::Relaxed);
        self.source_id.store(v.source_id, Ordering::Relaxed);
        self.range_gpa.store(v.range_gpa, Ordering::Relaxed);
        self.range_len.store(v.range_len, Ordering::Relaxed);
        self.protected_len.store(v.protected_len, Ordering::Relaxed);
        self.ring_capacity.store(v.ring_capacity, Ordering::Relaxed);
        self.status_offset.store(v.status_offset, Ordering::Relaxed);
        self.ring_offset.store(v.ring_offset, Ordering::Relaxed);
        self.kick_gpa.store(v.kick_gpa, Ordering::Relaxed);
        // Release: a reader that sees the new even generation sees these fields.
        self.generation
            .store((g | 1).wrapping_add(1), Ordering::Release);
    }

    /// Reads the entry, detecting a concurrent rewrite (then [`ReadError::Torn`]).
    pub fn read(&self) -> Result<Designation, ReadError> {
        let g1 = self.generation.load(Ordering::Acquire);
        if g1 & 1 != 0 {
            return Err(ReadError::Torn);
        }
        let source = self.source.load(Ordering::Relaxed);
        let d = Designation {
            source: SourceType::GuestVcpu,
            source_id: self.source_id.load(Ordering::Relaxed),
            host_cpu: self.host_cpu.load(Ordering::Relaxed),
            range_gpa: self.range_gpa.load(Ordering::Relaxed),
            range_len: self.range_len.load(Ordering::Relaxed),
            protected_len: self.protected_len.load(Ordering::Relaxed),
            status_offset: self.status_offset.load(Ordering::Relaxed),
            ring_offset: self.ring_offset.load(Ordering::Relaxed),
            ring_capacity: self.ring_capacity.load(Ordering::Relaxed),
            kick_gpa: self.kick_gpa.load(Ordering::Relaxed),
        };
        // Seqlock reader: the field loads above are ordered before the re-read.
        fence(Ordering::Acquire);
        if self.generation.load(Ordering::Relaxed) != g1 {
            return Err(ReadError::Torn);
        }
        match SourceType::from_raw(source) {
            Some(source) => Ok(Designation { source, ..d }),
            None if source == 0 => Err(ReadError::Free),
            None => Err(ReadError::BadSource(source)),
        }
    }
}

impl Default for DesignationSlot {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Designation {
        Designation::standard(
            SourceType::GuestVcpu,
            ANY_SOURCE,
            1,
            0x20_0000,
            256,
            0xD000_0000,
        )
    }

    #[test]
    fn standard_layout_validates() {
        let d = sample();
        assert_eq!(d.range_len, 2 * PAGE_SIZE);
        let l = d.ring_layout().unwrap();
        assert_eq!(l.status_offset, 0);
        assert_eq!(l.header_offset, PAGE_SIZE);
        assert_eq!(l.slots_offset, PAGE_SIZE + HEADER_SIZE as u64);
        assert_eq!(l.capacity, 256);
        let big = Designation::standard(SourceType::GuestVcpu, 0, 0, 0, MAX_CAPACITY, 0);
        assert!(big.ring_layout().is_ok());
    }

    #[test]
    fn host_written_ranges_are_protected_whole() {
        for source in [SourceType::HostCpu, SourceType::Device] {
            let d = Designation::host_written(source, ANY_SOURCE, 1, 0x20_0000, MAX_CAPACITY);
            assert!(!d.guest_writes());
            // 64 B status + 256 B header + 16 KiB slots -> 5 pages, all protected.
            assert_eq!(d.range_len, 5 * PAGE_SIZE);
            assert_eq!(u64::from(d.protected_len), d.range_len);
            assert_eq!(d.kick_gpa, 0);
            let l = d.ring_layout().unwrap();
            assert_eq!(l.status_offset, 0);
            assert_eq!(l.header_offset, STATUS_SIZE as u64);
            assert_eq!(l.slots_offset, (STATUS_SIZE + HEADER_SIZE) as u64);
            // The vCPU layout (ring writable by the guest) is refused for it...
            let exposed = Designation::standard(source, ANY_SOURCE, 1, 0x20_0000, 256, 0);
            assert_eq!(exposed.ring_layout(), Err(DesignationError::BadRingOffset));
            // ...as is a ring over its own status words.
            let over = Designation {
                ring_offset: 0,
                ..d
            };
            assert_eq!(over.ring_layout(), Err(DesignationError::BadRingOffset));
            // And a vCPU range may not have its ring in the protected portion.
            let hidden = Designation {
                source: SourceType::GuestVcpu,
                ..d
            };
            assert_eq!(hidden.ring_layout(), Err(DesignationError::BadRingOffset));
        }
    }

    #[test]
    fn bad_layouts_are_rejected() {
        let d = sample();
        let cases = [
            (
                Designation { range_gpa: 1, ..d },
                DesignationError::BadRange,
            ),
            (
                Designation {
                    range_gpa: !4095,
                    ..d
                },
                DesignationError::BadRange,
            ),
            (
                Designation { range_len: 0, ..d },
                DesignationError::BadRange,
            ),
            (
                Designation {
                    protected_len: 100,
                    ..d
                },
                DesignationError::BadProtectedLen,
            ),
            (
                Designation {
                    protected_len: 3 * 4096,
                    ..d
                },
                DesignationError::BadProtectedLen,
            ),
            (
                Designation {
                    status_offset: 8,
                    ..d
                },
                DesignationError::BadStatusOffset,
            ),
            (
                Designation {
                    status_offset: 4096 - 32,
                    ..d
                },
                DesignationError::BadStatusOffset,
            ),
            (
                Designation {
                    ring_capacity: 3,
                    ..d
                },
                DesignationError::BadCapacity,
            ),
            (
                Designation {
                    ring_capacity: 1,
                    ..d
                },
                DesignationError::BadCapacity,
            ),
            (
                Designation {
                    ring_capacity: 2 * MAX_CAPACITY,
                    ..d
                },
                DesignationError::BadCapacity,
            ),
            (
                Designation {
                    ring_offset: 0,
                    ..d
                },
                DesignationError::BadRingOffset,
            ),
            (
                Designation {
                    ring_offset: 4100,
                    ..d
                },
                DesignationError::BadRingOffset,
            ),
            (
                Designation {
                    ring_capacity: 512,
                    ..d
                },
                DesignationError::BadRingOffset,
            ),
        ];
        for (d, e) in cases {
            assert_eq!(d.ring_layout(), Err(e), "{d:?}");
        }
    }

    #[test]
    fn slot_round_trips_and_frees() {
        let slot = DesignationSlot::new();
        assert_eq!(slot.read(), Err(ReadError::Free));
        let d = sample();
        slot.write(Some(&d));
        assert_eq!(slot.read(), Ok(d));
        assert_eq!(slot.generation.load(Ordering::Relaxed), 2);
        slot.write(None);
        assert_eq!(slot.read(), Err(ReadError::Free));
        assert_eq!(slot.generation.load(Ordering::Relaxed), 4);
        slot.source.store(9, Ordering::Relaxed);
        assert_eq!(slot.read(), Err(ReadError::BadSource(9)));
        slot.generation.store(5, Ordering::Relaxed);
        assert_eq!(slot.read(), Err(ReadError::Torn));
    }

    #[test]
    fn concurrent_rewrites_are_never_seen_torn() {
        extern crate std;
        use std::sync::atomic::AtomicBool;
        let slot = DesignationSlot::new();
        let stop = AtomicBool::new(false);
        // Two designations whose every field differs: a mix would be detectable.
        let a = sample();
        let b = Designation {
            source: SourceType::Device,
            source_id: 7,
            host_cpu: 0,
            range_gpa: 0x40_0000,
            range_len: 4 * PAGE_SIZE,
            protected_len: 4 * PAGE_SIZE as u32,
            status_offset: 64,
            ring_offset: 3 * PAGE_SIZE as u32,
            ring_capacity: 64,
            kick_gpa: 0xD000_1000,
        };
        assert!(b.ring_layout().is_ok());
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..20_000 {
                    slot.write(Some(if i % 2 == 0 { &a } else { &b }));
                }
                stop.store(true, Ordering::Relaxed);
            });
            let mut seen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match slot.read() {
                    Ok(d) => {
                        assert!(d == a || d == b, "torn read accepted: {d:?}");
                        seen += 1;
                    }
                    Err(ReadError::Torn | ReadError::Free) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
            std::println!("{seen} consistent reads");
        });
    }
}
