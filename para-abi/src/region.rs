//! The para region: guest memory the shim shares with the guest for the paravirtual
//! mechanisms. Its address and size come from CPUID leaf
//! [`LEAF_PARA_REGION`](crate::discovery::LEAF_PARA_REGION).
//!
//! ```text
//! offset 0     RegionHeader (128 bytes)
//! offset 128   designation table: TABLE_CAPACITY × DesignationSlot (64 bytes each)
//! offset 2304  queue routes: ROUTE_CAPACITY × u64, which host CPU serves
//!              each device queue (see [`Route`])
//! ...          (the rest of the first page is reserved)
//! ranges       anywhere in guest RAM the table says (the shim puts them after
//!              the first page of the region; see `doorbell::designation`)
//! ```
//!
//! The host writes the header and the table; the guest only reads them (the shim
//! may map the page read-only). The host never reads them back: it keeps its own
//! copy of every designation, so nothing the guest writes here can mislead it.
//!
//! Notifications (reference text, FIG. 2 blocks 210 and 230): the *memory
//! designation notification* is the table plus [`RegionHeader::generation`], a
//! seqlock over the whole table that the host makes odd while it rewrites entries
//! and even (and larger) afterwards — a guest that sees it change re-reads the
//! table. The *memory writing notification* is [`RegionHeader::writing_allowed`]:
//! the guest writes into designated ranges only while it is [`WRITING_ALLOWED`].
//! Where the shim can interrupt the guest, it also raises
//! [`RegionHeader::notify_vector`] after either changes; otherwise the guest polls.
//!
//! The *queue routes* say which host CPU serves each device queue: the
//! guest's event source manager keeps the association between its ranges
//! and their host CPUs (each designation names one) and writes an event for
//! a queue into a range of the CPU its route names (reference text claim 5).
//! The same generation covers them.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use crate::doorbell::designation::{Designation, DesignationSlot, ReadError, SLOT_BYTES};

/// `"EXLSPARA"` as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"EXLSPARA");
/// Layout version of this crate.
pub const VERSION: u32 = 1;
/// Size of [`RegionHeader`].
pub const HEADER_SIZE: usize = 128;
/// Offset of the designation table in the region.
pub const TABLE_OFFSET: usize = HEADER_SIZE;
/// Entries in the designation table.
pub const TABLE_CAPACITY: usize = 32;
/// Offset of the queue-route table in the region.
pub const ROUTE_OFFSET: usize = 2304;
/// Entries in the queue-route table.
pub const ROUTE_CAPACITY: usize = 64;
/// Bytes at the start of the region holding header and tables (one page).
pub const CONTROL_SIZE: usize = 4096;

/// One queue route: events for `device`'s queue `queue` go to a range of
/// `host_cpu`'s monitor. Stored as one u64: bit 63 set for a used entry,
/// bits 32..63 the host CPU (31 bits), 16..32 the queue, 0..8 the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub device: u8,
    pub queue: u16,
    pub host_cpu: u32,
}

impl Route {
    const USED: u64 = 1 << 63;
    /// Host CPUs a route can name (31 bits).
    pub const MAX_CPU: u32 = (1 << 31) - 1;

    /// The stored word; `None` for a host CPU beyond [`Route::MAX_CPU`].
    #[must_use]
    pub const fn encode(&self) -> Option<u64> {
        if self.host_cpu > Self::MAX_CPU {
            return None;
        }
        Some(
            Self::USED
                | (self.host_cpu as u64) << 32
                | (self.queue as u64) << 16
                | self.device as u64,
        )
    }

    /// `None` for a free entry; any used word decodes (unused bits ignored).
    #[must_use]
    pub const fn decode(v: u64) -> Option<Self> {
        if v & Self::USED == 0 {
            return None;
        }
        Some(Self {
            device: v as u8,
            queue: (v >> 16) as u16,
            host_cpu: ((v >> 32) as u32) & Self::MAX_CPU,
        })
    }
}

/// [`RegionHeader::writing_allowed`]: the guest must not write into ranges.
pub const WRITING_FORBIDDEN: u32 = 0;
/// [`RegionHeader::writing_allowed`]: the guest may deliver events by writing.
pub const WRITING_ALLOWED: u32 = 1;

/// The header at offset 0 of the para region.
#[repr(C)]
pub struct RegionHeader {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: AtomicU32,
    /// [`HEADER_SIZE`].
    pub header_size: AtomicU32,
    /// Size of the whole region in bytes.
    pub region_size: AtomicU64,
    /// [`TABLE_OFFSET`].
    pub table_offset: AtomicU32,
    /// Entries in the table ([`TABLE_CAPACITY`]).
    pub table_capacity: AtomicU32,
    /// Size of one entry ([`SLOT_BYTES`]).
    pub entry_size: AtomicU32,
    /// [`WRITING_ALLOWED`] or [`WRITING_FORBIDDEN`] (memory writing notification).
    pub writing_allowed: AtomicU32,
    /// Table generation (seqlock): odd while the host rewrites the table.
    pub generation: AtomicU64,
    /// Interrupt vector the shim raises after changing the table or
    /// `writing_allowed`; 0 when it does not (the guest polls `generation`).
    pub notify_vector: AtomicU32,
    /// Reserved, zero.
    pub reserved0: AtomicU32,
    /// Reserved for later mechanisms, zero.
    pub reserved: [AtomicU64; 9],
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<RegionHeader>() == HEADER_SIZE);
    assert!(offset_of!(RegionHeader, magic) == 0);
    assert!(offset_of!(RegionHeader, version) == 8);
    assert!(offset_of!(RegionHeader, header_size) == 12);
    assert!(offset_of!(RegionHeader, region_size) == 16);
    assert!(offset_of!(RegionHeader, table_offset) == 24);
    assert!(offset_of!(RegionHeader, table_capacity) == 28);
    assert!(offset_of!(RegionHeader, entry_size) == 32);
    assert!(offset_of!(RegionHeader, writing_allowed) == 36);
    assert!(offset_of!(RegionHeader, generation) == 40);
    assert!(offset_of!(RegionHeader, notify_vector) == 48);
    assert!(TABLE_OFFSET + TABLE_CAPACITY * SLOT_BYTES <= ROUTE_OFFSET);
    assert!(ROUTE_OFFSET.is_multiple_of(64));
    assert!(ROUTE_OFFSET + ROUTE_CAPACITY * 8 <= CONTROL_SIZE);
};

/// Why memory is not a para region this crate understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// Base not 64-byte aligned or size smaller than [`CONTROL_SIZE`].
    BadMemory,
    /// The magic is wrong.
    BadMagic(u64),
    /// A version this crate does not know.
    BadVersion(u32),
    /// Header size, table offset, capacity or entry size differ from this crate's.
    BadGeometry,
    /// The host kept the table generation odd (mid-update) for every attempt.
    Busy,
}

/// Views of the header and the table of a para region.
#[derive(Clone, Copy)]
pub struct Region<'a> {
    /// The header.
    pub header: &'a RegionHeader,
    /// The designation table.
    pub table: &'a [DesignationSlot; TABLE_CAPACITY],
    /// The queue routes ([`Route`] words).
    pub routes: &'a [AtomicU64; ROUTE_CAPACITY],
}

impl Region<'_> {
    /// Views of para-region memory without checking its contents (the host, which
    /// then calls [`Region::init`]).
    ///
    /// # Safety
    /// `base` must point to at least [`CONTROL_SIZE`] bytes, 64-byte aligned, valid
    /// for reads and writes for `'a` and accessed only atomically meanwhile.
    #[must_use]
    pub unsafe fn from_raw(base: *const u8) -> Self {
        // SAFETY: per the caller (including the alignment); the types are plain
        // atomics, valid for any bits.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            Self {
                header: &*base.cast::<RegionHeader>(),
                table: &*base
                    .add(TABLE_OFFSET)
                    .cast::<[DesignationSlot; TABLE_CAPACITY]>(),
                routes: &*base.add(ROUTE_OFFSET).cast::<[AtomicU64; ROUTE_CAPACITY]>(),
            }
        }
    }

    /// Views of a para region the host initialised (the guest), checking its header.
    ///
    /// # Safety
    /// As [`Region::from_raw`], with `size` the region size from CPUID.
    pub unsafe fn open(base: *const u8, size: u64) -> Result<Self, RegionError> {
        if base.align_offset(64) != 0 || size < CONTROL_SIZE as u64 {
            return Err(RegionError::BadMemory);
        }
        // SAFETY: per the caller, and checked alignment and size above.
        let region = unsafe { Self::from_raw(base) };
        region.check()?;
        Ok(region)
    }

    /// Checks magic, version and geometry.
    pub fn check(&self) -> Result<(), RegionError> {
        let h = self.header;
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(RegionError::BadMagic(magic));
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != VERSION {
            return Err(RegionError::BadVersion(version));
        }
        if h.header_size.load(Ordering::Relaxed) as usize != HEADER_SIZE
            || h.table_offset.load(Ordering::Relaxed) as usize != TABLE_OFFSET
            || h.table_capacity.load(Ordering::Relaxed) as usize != TABLE_CAPACITY
            || h.entry_size.load(Ordering::Relaxed) as usize != SLOT_BYTES
        {
            return Err(RegionError::BadGeometry);
        }
        Ok(())
    }

    /// Host: writes a fresh header and an empty table. Writing not yet allowed.
    pub fn init(&self, region_size: u64, notify_vector: u32) {
        let h = self.header;
        for slot in self.table {
            slot.write(None);
        }
        for r in self.routes {
            r.store(0, Ordering::Relaxed);
        }
        h.version.store(VERSION, Ordering::Relaxed);
        h.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
        h.region_size.store(region_size, Ordering::Relaxed);
        h.table_offset.store(TABLE_OFFSET as u32, Ordering::Relaxed);
        h.table_capacity
            .store(TABLE_CAPACITY as u32, Ordering::Relaxed);
        h.entry_size.store(SLOT_BYTES as u32, Ordering::Relaxed);
        h.writing_allowed
            .store(WRITING_FORBIDDEN, Ordering::Relaxed);
        h.generation.store(0, Ordering::Relaxed);
        h.notify_vector.store(notify_vector, Ordering::Relaxed);
        h.reserved0.store(0, Ordering::Relaxed);
        for r in &h.reserved {
            r.store(0, Ordering::Relaxed);
        }
        // Magic last, Release: a guest that sees it sees the rest.
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// Host: (re)designates: `entries[i]` goes to table entry `i`, the rest are freed,
    /// all under one odd/even bump of the table generation. Returns the new (even)
    /// generation. Extra entries past [`TABLE_CAPACITY`] are ignored.
    #[allow(clippy::must_use_candidate)] // the generation is informational
    pub fn designate(&self, entries: &[Designation]) -> u64 {
        self.rewrite(|| {
            for (i, slot) in self.table.iter().enumerate() {
                slot.write(entries.get(i));
            }
        })
    }

    /// Host: runs `write` with the generation odd (the seqlock's writer
    /// side), then makes it even and larger. Returns the new generation.
    fn rewrite(&self, write: impl FnOnce()) -> u64 {
        let h = self.header;
        let g = h.generation.load(Ordering::Relaxed);
        h.generation.store(g | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        write();
        let next = (g | 1).wrapping_add(1);
        h.generation.store(next, Ordering::Release);
        next
    }

    /// Guest: runs `read` until it sees one even generation before and after
    /// (the seqlock's reader side; `read` returns false for a torn entry), at
    /// most `attempts` times. Returns that generation.
    fn read_consistent(
        &self,
        attempts: u32,
        mut read: impl FnMut() -> bool,
    ) -> Result<u64, RegionError> {
        for _ in 0..attempts {
            let g1 = self.header.generation.load(Ordering::Acquire);
            if g1 & 1 != 0 {
                core::hint::spin_loop();
                continue;
            }
            if !read() {
                continue;
            }
            fence(Ordering::Acquire);
            if self.header.generation.load(Ordering::Relaxed) == g1 {
                return Ok(g1);
            }
        }
        Err(RegionError::Busy)
    }

    /// Host: publishes the queue routes (entries past [`ROUTE_CAPACITY`], and
    /// routes naming a CPU beyond [`Route::MAX_CPU`], are left out), the rest
    /// freed, under one odd/even bump of the generation. Returns how many were
    /// published.
    #[allow(clippy::must_use_candidate)] // the count is informational
    pub fn set_routes(&self, routes: &[Route]) -> usize {
        let mut words = routes.iter().filter_map(Route::encode);
        let mut n = 0;
        self.rewrite(|| {
            for slot in self.routes {
                let w = words.next().unwrap_or(0);
                n += usize::from(w != 0);
                slot.store(w, Ordering::Relaxed);
            }
        });
        n
    }

    /// Guest: a consistent copy of the queue routes (as [`Self::snapshot`]).
    pub fn snapshot_routes(
        &self,
        out: &mut [Option<Route>; ROUTE_CAPACITY],
        attempts: u32,
    ) -> Result<u64, RegionError> {
        self.read_consistent(attempts, || {
            for (slot, out) in self.routes.iter().zip(out.iter_mut()) {
                *out = Route::decode(slot.load(Ordering::Relaxed));
            }
            true
        })
    }

    /// Host: the memory writing notification.
    pub fn set_writing_allowed(&self, allowed: bool) {
        let v = if allowed {
            WRITING_ALLOWED
        } else {
            WRITING_FORBIDDEN
        };
        self.header.writing_allowed.store(v, Ordering::Release);
    }

    /// Guest: may it write into designated ranges now?
    #[must_use]
    pub fn writing_allowed(&self) -> bool {
        self.header.writing_allowed.load(Ordering::Acquire) == WRITING_ALLOWED
    }

    /// Guest: the current table generation (cheap check whether to re-read).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.header.generation.load(Ordering::Acquire)
    }

    /// Guest: a consistent copy of the whole table. `out[i]` gets entry `i`
    /// (`None` for free or unusable entries; entries that fail
    /// [`Designation::ring_layout`] count as unusable). Retries a torn snapshot up to
    /// `attempts` times. Returns the generation the copy belongs to.
    pub fn snapshot(
        &self,
        out: &mut [Option<Designation>; TABLE_CAPACITY],
        attempts: u32,
    ) -> Result<u64, RegionError> {
        self.read_consistent(attempts, || {
            for (slot, out) in self.table.iter().zip(out.iter_mut()) {
                *out = match slot.read() {
                    Ok(d) if d.ring_layout().is_ok() => Some(d),
                    Ok(_) | Err(ReadError::Free | ReadError::BadSource(_)) => None,
                    Err(ReadError::Torn) => return false,
                };
            }
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::designation::{ANY_SOURCE, SourceType};

    #[repr(C, align(4096))]
    struct Page([u8; CONTROL_SIZE]);

    #[test]
    fn init_designate_snapshot() {
        let mut page = Page([0xEE; CONTROL_SIZE]);
        let base = page.0.as_mut_ptr();
        // SAFETY: a local, aligned page accessed only through the region below.
        let host = unsafe { Region::from_raw(base) };
        assert_eq!(
            // SAFETY: as above.
            unsafe { Region::open(base, CONTROL_SIZE as u64) }.err(),
            Some(RegionError::BadMagic(0xEEEE_EEEE_EEEE_EEEE))
        );
        host.init(0x10_0000, 0);
        // SAFETY: as above.
        let guest = unsafe { Region::open(base, 0x10_0000) }.unwrap();
        assert!(!guest.writing_allowed());
        let mut out = [None; TABLE_CAPACITY];
        assert_eq!(guest.snapshot(&mut out, 4), Ok(0));
        assert!(out.iter().all(Option::is_none));

        let d0 = Designation::standard(
            SourceType::GuestVcpu,
            ANY_SOURCE,
            0,
            0x1000,
            64,
            0xD000_0000,
        );
        let d1 = Designation::host_written(SourceType::Device, 3, 1, 0x3000, 64);
        let bad = Designation {
            ring_capacity: 3,
            ..d1
        };
        assert_eq!(host.designate(&[d0, d1, bad]), 2);
        host.set_writing_allowed(true);
        assert!(guest.writing_allowed());
        assert_eq!(guest.snapshot(&mut out, 4), Ok(2));
        assert_eq!(out[0], Some(d0));
        assert_eq!(out[1], Some(d1));
        assert_eq!(out[2], None);

        host.header.generation.store(3, Ordering::Relaxed);
        assert_eq!(guest.snapshot(&mut out, 4), Err(RegionError::Busy));
        host.header.version.store(9, Ordering::Relaxed);
        assert_eq!(guest.check(), Err(RegionError::BadVersion(9)));
    }

    #[test]
    fn routes_publish_read_back_and_bump_the_generation() {
        let mut page = Page([0xEE; CONTROL_SIZE]);
        let base = page.0.as_mut_ptr();
        // SAFETY: a local, aligned page accessed only through the regions below.
        let host = unsafe { Region::from_raw(base) };
        host.init(0x10_0000, 0);
        // SAFETY: as above.
        let guest = unsafe { Region::open(base, 0x10_0000) }.unwrap();
        let mut out = [None; ROUTE_CAPACITY];
        assert_eq!(guest.snapshot_routes(&mut out, 4), Ok(0));
        assert!(
            out.iter().all(Option::is_none),
            "init clears the 0xEE bytes"
        );
        let rx = Route {
            device: 1,
            queue: 0,
            host_cpu: 7,
        };
        let tx = Route { queue: 1, ..rx };
        let far = Route {
            host_cpu: u32::MAX,
            ..rx
        };
        assert_eq!(host.set_routes(&[rx, far, tx]), 2);
        assert_eq!(guest.snapshot_routes(&mut out, 4), Ok(2));
        assert_eq!(&out[..3], &[Some(rx), Some(tx), None]);
        let many = [rx; ROUTE_CAPACITY + 3];
        assert_eq!(host.set_routes(&many), ROUTE_CAPACITY);
        host.header.generation.store(5, Ordering::Relaxed);
        assert_eq!(guest.snapshot_routes(&mut out, 4), Err(RegionError::Busy));
        for v in [0, 1 << 63, u64::MAX, 0x7FFF_FFFF_FFFF_FFFF] {
            let r = Route::decode(v);
            assert_eq!(r.is_some(), v >> 63 == 1);
            if let Some(r) = r {
                assert_eq!(Route::decode(r.encode().unwrap()), Some(r));
            }
        }
    }

    #[test]
    fn open_rejects_small_or_misaligned_memory() {
        let mut page = Page([0; CONTROL_SIZE]);
        let base = page.0.as_mut_ptr();
        // SAFETY: the checks fail before any access.
        unsafe {
            assert_eq!(Region::open(base, 100).err(), Some(RegionError::BadMemory));
            assert_eq!(
                Region::open(base.add(8), CONTROL_SIZE as u64).err(),
                Some(RegionError::BadMemory)
            );
        }
    }
}
