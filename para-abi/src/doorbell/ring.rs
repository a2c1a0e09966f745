//! The multi-producer, single-consumer event ring of one designated range.
//!
//! See the [module documentation](super) for the protocol and its ordering
//! argument; this file is the code that implements it.

#[cfg(not(loom))]
use super::geometry::RingLayout;
pub use super::geometry::{HEADER_SIZE, MAX_CAPACITY, SLOT_SIZE, STATUS_SIZE};
use super::record::{self, Event, Op, RecordError};
use super::sync::{AtomicU32, AtomicU64, Ordering, fence};

/// How many times a producer retries reserving a slot against other producers
/// before it coalesces its event instead. Keeps [`Ring::send`] wait-free: a vCPU
/// never spins unboundedly on the doorbell.
pub const MAX_RESERVE_ATTEMPTS: u32 = 16;

/// [`RingStatus::parked`] value while the monitor runs (or spins).
pub const RUNNING: u32 = 0;
/// [`RingStatus::parked`] value while the monitor sleeps: a producer that reads it
/// after publishing must issue the trapping kick.
pub const PARKED: u32 = 1;

/// Devices whose events coalesce per (device, queue, op) when the ring is full.
pub const EXACT_DEVICES: usize = 16;
/// Queues per device that coalesce per (device, queue, op).
pub const EXACT_QUEUES: usize = 16;
/// Words of the overflow set: one per exact device (bit = queue * 4 + op index),
/// then four words with one bit per device (any device index) for the rest.
pub const OVERFLOW_WORDS: usize = EXACT_DEVICES + 256 / 64;

/// The host-written status of a ring. It lives in the range's protected portion
/// (mapped read-only into the guest), so the guest can read but never forge it.
#[repr(C, align(64))]
pub struct RingStatus {
    /// The consumer's position: every position below it has been consumed and its
    /// slot cleared. Producers read it to see whether the ring has room.
    pub head: AtomicU64,
    /// [`RUNNING`] or [`PARKED`].
    pub parked: AtomicU32,
    /// Reserved, zero.
    pub reserved: AtomicU32,
}

/// A cache line of its own, so the producers' hot word does not share a line with
/// the overflow set.
#[repr(C, align(64))]
pub struct Tail(pub AtomicU64);

/// The guest-writable control words of a ring; the slots follow it.
#[repr(C, align(64))]
pub struct RingHeader {
    /// The next position a producer will reserve (only producers write it).
    pub tail: Tail,
    /// Bit `w` set: word `w` of [`Self::overflow`] may have bits set.
    pub overflow_summary: AtomicU64,
    /// The coalescing overflow set (see [`Pending`]).
    pub overflow: [AtomicU64; OVERFLOW_WORDS],
    /// Non-zero once a producer took on the kick for the current park; the consumer
    /// clears it in [`Consumer::unpark`]. Producers that find it set skip their
    /// kick, so a parked monitor costs one exit, not one per event until it runs.
    pub kicked: AtomicU64,
}

#[cfg(not(loom))]
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RingStatus>() == STATUS_SIZE);
    assert!(offset_of!(RingStatus, head) == 0);
    assert!(offset_of!(RingStatus, parked) == 8);
    assert!(size_of::<RingHeader>() == HEADER_SIZE);
    assert!(align_of::<RingHeader>() == 64);
    assert!(offset_of!(RingHeader, tail) == 0);
    assert!(offset_of!(RingHeader, overflow_summary) == 64);
    assert!(offset_of!(RingHeader, overflow) == 72);
    assert!(offset_of!(RingHeader, kicked) == 72 + OVERFLOW_WORDS * 8);
    assert!(OVERFLOW_WORDS <= 64);
    assert!(size_of::<AtomicU64>() == SLOT_SIZE);
};

impl RingStatus {
    /// A fresh status: position 0, monitor running.
    #[must_use]
    pub fn new() -> Self {
        Self {
            head: AtomicU64::new(0),
            parked: AtomicU32::new(RUNNING),
            reserved: AtomicU32::new(0),
        }
    }
}

impl Default for RingStatus {
    fn default() -> Self {
        Self::new()
    }
}

impl RingHeader {
    /// A fresh header: position 0, nothing pending.
    #[must_use]
    pub fn new() -> Self {
        Self {
            tail: Tail(AtomicU64::new(0)),
            overflow_summary: AtomicU64::new(0),
            overflow: core::array::from_fn(|_| AtomicU64::new(0)),
            kicked: AtomicU64::new(0),
        }
    }
}

impl Default for RingHeader {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a ring cannot be built over the memory given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The slot count is not a power of two in `2..=MAX_CAPACITY`.
    BadCapacity(usize),
    /// The status or header is not 64-byte aligned, or the slots not 8-byte aligned.
    Misaligned,
}

/// One ring: views of the shared words, no ownership, no allocation.
///
/// Both sides build one over the same memory; the guest calls [`Ring::send`], the
/// host drives a [`Consumer`] over it.
#[derive(Clone, Copy)]
pub struct Ring<'a> {
    status: &'a RingStatus,
    header: &'a RingHeader,
    slots: &'a [AtomicU64],
    mask: u64,
}

/// Which path an event took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Published in the ring at this position.
    Ring(u64),
    /// The ring was full (or contended past [`MAX_RESERVE_ATTEMPTS`]): the event's
    /// key was added to the overflow set.
    Overflow,
}

/// What [`Ring::send`] did, and whether the caller must kick.
#[must_use = "when `kick` is set the caller must issue the trapping kick, or the event may wait forever"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The path the event took.
    pub via: Via,
    /// The monitor was parked after the event was published and no other producer
    /// has taken on the kick: issue the trapping kick (the range's kick address).
    pub kick: bool,
}

/// An entry of the overflow set, as the consumer drains it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pending {
    /// At least one event with this key was coalesced (its `arg` is 0: arguments
    /// do not survive coalescing).
    Event(Event),
    /// At least one event of this device (any queue, any operation) was coalesced:
    /// its key lay outside the exact part of the set.
    Device(u8),
}

/// The overflow word and bit an event's key coalesces into.
#[must_use]
pub const fn overflow_position(event: &Event) -> (usize, u32) {
    let device = event.device as usize;
    let queue = event.queue as usize;
    if device < EXACT_DEVICES && queue < EXACT_QUEUES {
        (device, (queue * Op::ALL.len() + event.op.index()) as u32)
    } else {
        (EXACT_DEVICES + device / 64, (device % 64) as u32)
    }
}

/// The pending entry an overflow bit stands for. Total for `word < OVERFLOW_WORDS`
/// and `bit < 64`; `None` otherwise.
#[must_use]
pub const fn pending_at(word: usize, bit: u32) -> Option<Pending> {
    if bit >= 64 {
        return None;
    }
    if word < EXACT_DEVICES {
        let queue = bit as usize / Op::ALL.len();
        let op = Op::ALL[bit as usize % Op::ALL.len()];
        Some(Pending::Event(Event::new(word as u8, queue as u16, op)))
    } else if word < OVERFLOW_WORDS {
        Some(Pending::Device(
            ((word - EXACT_DEVICES) * 64 + bit as usize) as u8,
        ))
    } else {
        None
    }
}

impl<'a> Ring<'a> {
    /// A ring over the given words. `slots.len()` is the capacity.
    pub fn new(
        status: &'a RingStatus,
        header: &'a RingHeader,
        slots: &'a [AtomicU64],
    ) -> Result<Self, RingError> {
        let n = slots.len();
        if !n.is_power_of_two() || n < 2 || n > MAX_CAPACITY as usize {
            return Err(RingError::BadCapacity(n));
        }
        Ok(Self {
            status,
            header,
            slots,
            mask: n as u64 - 1,
        })
    }

    /// A ring over raw shared memory: the range that starts at `base` (guest RAM
    /// mapped on the host side, the identity-mapped range on the guest side), laid
    /// out as `layout` says.
    ///
    /// # Safety
    /// `base` must point to the whole range `layout` came from (its
    /// [`Designation`](super::designation::Designation) was validated into
    /// `layout`), valid for reads and writes for `'a`, and its ring parts only ever
    /// accessed atomically meanwhile (by this crate's types or another CPU's locked
    /// instructions). Concurrent writes of any values by a hostile party are fine.
    #[cfg(not(loom))]
    pub unsafe fn from_range(base: *const u8, layout: &RingLayout) -> Result<Self, RingError> {
        // SAFETY: the offsets lie inside the range (validated layout), per the caller.
        let (status, header, slots) = unsafe {
            (
                base.add(layout.status_offset as usize),
                base.add(layout.header_offset as usize),
                base.add(layout.slots_offset as usize),
            )
        };
        if status.align_offset(64) != 0
            || header.align_offset(64) != 0
            || slots.align_offset(8) != 0
        {
            return Err(RingError::Misaligned);
        }
        // SAFETY: in bounds and valid per the caller, aligned as checked above; the
        // types are `repr(C)` atomics, valid for every bit pattern.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            let slots =
                core::slice::from_raw_parts(slots.cast::<AtomicU64>(), layout.capacity as usize);
            Self::new(
                &*status.cast::<RingStatus>(),
                &*header.cast::<RingHeader>(),
                slots,
            )
        }
    }

    /// Number of slots.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.mask + 1
    }

    /// The status words (protected portion).
    #[must_use]
    pub fn status(&self) -> &'a RingStatus {
        self.status
    }

    /// The producer words (guest-writable portion).
    #[must_use]
    pub fn header(&self) -> &'a RingHeader {
        self.header
    }

    fn slot(&self, position: u64) -> &'a AtomicU64 {
        // `mask < slots.len()` by construction, so the index is in bounds.
        &self.slots[(position & self.mask) as usize]
    }

    /// Guest side: publishes `event` and says whether the monitor must be kicked.
    ///
    /// Never loses the event and never blocks: it goes into the ring, or — ring full,
    /// or [`MAX_RESERVE_ATTEMPTS`] lost races — into the overflow set.
    pub fn send(&self, event: Event) -> Sent {
        let via = self.publish(event);
        // Dekker with `Consumer::park`: our publication (slot store or overflow
        // fetch_or) is ordered before this fence; the consumer's `parked` store is
        // ordered before its fence. Whichever fence comes first in the single total
        // order, the other side's later load sees the earlier side's store: either
        // we see PARKED and kick, or the consumer's re-check sees our event.
        fence(Ordering::SeqCst);
        // Parked: one producer per park takes on the kick (the swap that finds 0).
        // One that finds it taken may skip: its swap precedes the consumer's clear
        // of `kicked` in `unpark`, so its fence precedes the consumer's fence there
        // in the total order, and the consumer's polls after that fence see our
        // publication.
        let kick = self.status.parked.load(Ordering::Relaxed) == PARKED
            && self.header.kicked.swap(1, Ordering::Relaxed) == 0;
        Sent { via, kick }
    }

    fn publish(&self, event: Event) -> Via {
        for _ in 0..MAX_RESERVE_ATTEMPTS {
            // Acquire pairs with the consumer's Release store of `head`, which it
            // makes after clearing the slots below `head`: the clear of the slot we
            // are about to fill happens before our store to it.
            let head = self.status.head.load(Ordering::Acquire);
            // `head` first, then `tail`: the consumer reached `head` by acquiring the
            // records below it, whose producers had advanced `tail` past them, so
            // this load cannot return a `tail` older than `head` (read the other way
            // round, a stale `tail` below `head` would look like a full ring — loom
            // found that one). `head` only grows, so room seen now stays room. A
            // `head` above `tail` (a corrupt status) wraps to "full".
            let tail = self.header.tail.0.load(Ordering::Relaxed);
            if tail.wrapping_sub(head) >= self.capacity() {
                return self.coalesce(event);
            }
            if self
                .header
                .tail
                .0
                .compare_exchange(
                    tail,
                    tail.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                // Position `tail` is ours alone. Release: whatever the caller wrote
                // before sending (descriptors, avail index) is visible to the
                // consumer that acquires this record.
                self.slot(tail).store(event.encode(tail), Ordering::Release);
                return Via::Ring(tail);
            }
        }
        self.coalesce(event)
    }

    fn coalesce(&self, event: Event) -> Via {
        let (word, bit) = overflow_position(&event);
        // Word first, then summary: a consumer that sees the summary bit (Acquire
        // swap reading our Release RMW) then swaps the word after our fetch_or.
        self.header.overflow[word].fetch_or(1 << bit, Ordering::Release);
        self.header
            .overflow_summary
            .fetch_or(1 << word, Ordering::Release);
        Via::Overflow
    }

    /// True when the monitor says it is parked (a producer that published earlier
    /// and has not kicked may use this to decide; [`Ring::send`] already does).
    #[must_use]
    pub fn is_parked(&self) -> bool {
        self.status.parked.load(Ordering::Relaxed) == PARKED
    }
}

/// Why the consumer rejected a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The check byte does not match: garbage or a non-atomic (torn) write.
    BadCheck,
    /// A well-formed record with an undefined operation.
    UnknownOp(u8),
    /// A well-formed record written for another position (a guest writing slots
    /// it did not reserve).
    WrongSequence {
        /// The tag the position expects.
        expected: u16,
        /// The tag the record carried.
        found: u16,
    },
}

/// A rejected slot: where, what was there, why. The slot was cleared and skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The ring position.
    pub position: u64,
    /// The raw word found.
    pub raw: u64,
    /// Why it was rejected.
    pub reason: RejectReason,
}

/// What one [`Consumer::poll`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polled {
    /// The next event, consumed.
    Event(Event),
    /// The next slot held something that is not a record for its position; it was
    /// consumed (cleared and skipped) so the ring keeps moving.
    Rejected(Rejection),
    /// The next slot is empty: nothing published yet (or a producer reserved it and
    /// has not stored yet; it will, and will kick if it then sees [`PARKED`]).
    Empty,
}

/// What [`Consumer::park`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Park {
    /// Parked: nothing was published before the re-check. Sleep until kicked, then
    /// call [`Consumer::unpark`].
    Sleep,
    /// Work arrived during the park attempt; `parked` was cleared again. Keep going.
    Retry,
}

/// The host's consumer: its position lives here, in host memory, never read back
/// from the guest. Every slot value is treated as hostile; every method is
/// panic-free and does a bounded amount of work whatever the memory holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Consumer {
    position: u64,
}

impl Consumer {
    /// A consumer at position 0, for a ring whose status and header are fresh.
    #[must_use]
    pub const fn new() -> Self {
        Self { position: 0 }
    }

    /// The next position to consume (also published as [`RingStatus::head`]).
    #[must_use]
    pub const fn position(&self) -> u64 {
        self.position
    }

    /// Host side: prepares a ring for (re)use by a fresh consumer: zero slots and
    /// overflow, `head` and `tail` 0, monitor running. Only while no guest writes.
    pub fn reset(&mut self, ring: &Ring<'_>) {
        for slot in ring.slots {
            slot.store(0, Ordering::Relaxed);
        }
        for word in &ring.header.overflow {
            word.store(0, Ordering::Relaxed);
        }
        ring.header.overflow_summary.store(0, Ordering::Relaxed);
        ring.header.kicked.store(0, Ordering::Relaxed);
        ring.header.tail.0.store(0, Ordering::Relaxed);
        ring.status.parked.store(RUNNING, Ordering::Relaxed);
        self.position = 0;
        ring.status.head.store(0, Ordering::Release);
    }

    /// Takes the next slot, if anything is there. O(1).
    pub fn poll(&mut self, ring: &Ring<'_>) -> Polled {
        let position = self.position;
        let slot = ring.slot(position);
        // Acquire pairs with the producer's Release store of the record.
        let raw = slot.load(Ordering::Acquire);
        let outcome = match record::decode(raw) {
            Err(RecordError::Empty) => return Polled::Empty,
            Ok(record) if record.is_for(position) => Polled::Event(record.event),
            Ok(record) => Polled::Rejected(Rejection {
                position,
                raw,
                reason: RejectReason::WrongSequence {
                    expected: (position & record::SEQUENCE_MASK) as u16,
                    found: record.sequence,
                },
            }),
            Err(RecordError::BadCheck) => Polled::Rejected(Rejection {
                position,
                raw,
                reason: RejectReason::BadCheck,
            }),
            Err(RecordError::UnknownOp(op)) => Polled::Rejected(Rejection {
                position,
                raw,
                reason: RejectReason::UnknownOp(op),
            }),
        };
        // Clear, then publish the new head with Release: a producer that sees the
        // new head (Acquire) and reserves this slot a lap later stores after the
        // clear, so the slot never holds a stale record when we come back to it.
        slot.store(0, Ordering::Relaxed);
        self.position = position.wrapping_add(1);
        ring.status.head.store(self.position, Ordering::Release);
        outcome
    }

    /// Drains the overflow set, calling `f` for each pending entry; returns how many.
    /// Call it after the ring read empty, and at least once per batch while the ring
    /// stays busy. Bounded: at most `OVERFLOW_WORDS * 64` calls.
    pub fn drain_overflow(&mut self, ring: &Ring<'_>, mut f: impl FnMut(Pending)) -> usize {
        let header = ring.header;
        // Acquire pairs with the producers' Release fetch_or of the summary (and so
        // orders our word swaps after their word fetch_or).
        let summary = header.overflow_summary.swap(0, Ordering::Acquire);
        if summary == 0 {
            return 0;
        }
        let mut count = 0;
        for (word_index, word) in header.overflow.iter().enumerate() {
            // Summary bits past the last word are garbage from the guest: ignored.
            if summary & (1 << word_index) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::Acquire);
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                if let Some(pending) = pending_at(word_index, bit) {
                    f(pending);
                    count += 1;
                }
            }
        }
        count
    }

    /// True when the ring or the overflow set has something for us (a cheap peek).
    #[must_use]
    pub fn has_work(&self, ring: &Ring<'_>) -> bool {
        ring.slot(self.position).load(Ordering::Relaxed) != 0
            || ring.header.overflow_summary.load(Ordering::Relaxed) != 0
    }

    /// Tries to park: publishes [`PARKED`], then re-checks the ring and the overflow
    /// set. Call it only after [`Self::poll`] returned [`Polled::Empty`] and
    /// [`Self::drain_overflow`] ran.
    ///
    /// On [`Park::Sleep`] the caller sleeps on its kick (an eventfd: a kick that
    /// arrives before the sleep is remembered by its counter), then calls
    /// [`Self::unpark`] and polls again.
    #[must_use = "on `Park::Sleep` sleep on the kick; on `Park::Retry` keep polling"]
    pub fn park(&self, ring: &Ring<'_>) -> Park {
        ring.status.parked.store(PARKED, Ordering::Relaxed);
        // The other half of the Dekker pair in `Ring::send`: our PARKED store is
        // before this fence, our re-check after it. A producer whose fence came
        // earlier in the total order published before it — we see its record (or
        // summary bit) below. A producer whose fence comes later sees PARKED and
        // kicks. Either way nobody's event waits for a wake-up that never comes.
        fence(Ordering::SeqCst);
        if self.has_work(ring) {
            ring.status.parked.store(RUNNING, Ordering::Relaxed);
            Park::Retry
        } else {
            Park::Sleep
        }
    }

    /// Publishes that the monitor runs again; call it after the sleep returned
    /// (the kick eventfd was read), then poll. Clears `kicked` so the next park gets
    /// a kick again. A producer that skipped its kick swapped `kicked` before this
    /// clear, so its fence precedes ours in the total order and the polls after our
    /// fence see its event. (Without this fence the event would still not be lost —
    /// the next [`Self::park`]'s fence orders the same way and its re-check would
    /// see it — only later; loom confirms both.)
    pub fn unpark(&self, ring: &Ring<'_>) {
        ring.status.parked.store(RUNNING, Ordering::Relaxed);
        ring.header.kicked.store(0, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }
}

#[cfg(all(test, not(loom)))]
#[path = "ring_tests.rs"]
mod tests;

#[cfg(all(test, loom))]
#[path = "ring_loom.rs"]
mod loom_tests;
