//! M1 — exitless doorbells: events from guest vCPUs to host CPUs through
//! designated memory ranges (the mechanism of US 9,256,455, "Delivery of
//! events from a virtual machine to host CPU using memory monitoring
//! instructions").
//!
//! # The parts
//!
//! - [`designation`]: what a designated range is (address, length, host CPU,
//!   source type, protected portion, where its ring lives, the kick address) and
//!   the seqlocked table entry the shim publishes it in. The table itself sits in
//!   the para region ([`crate::region`]).
//! - [`record`]: the 64-bit event record (device, queue, operation, argument,
//!   sequence tag, check byte) and its total decoder.
//! - [`geometry`]: the sizes of a ring's parts and the validated
//!   [`RingLayout`] a designation yields (a leaf both of the others use).
//! - [`ring`]: the multi-producer / single-consumer ring of records, its
//!   coalescing overflow set and the park/kick handshake.
//!
//! # Who writes what
//!
//! | word                                 | lives in               | written by          | read by         |
//! |--------------------------------------|------------------------|---------------------|-----------------|
//! | `RingStatus::head`                   | protected portion      | host consumer       | guest producers |
//! | `RingStatus::parked`                 | protected portion      | host consumer       | guest producers |
//! | `RingHeader::tail`                   | writable portion       | guest producers     | guest producers |
//! | slots                                | writable portion       | producers; consumer clears | consumer |
//! | `RingHeader::overflow{,_summary}`    | writable portion       | producers (`fetch_or`); consumer (`swap(0)`) | both |
//! | `RingHeader::kicked`                 | writable portion       | producers (`swap(1)`); consumer clears | producers |
//!
//! The reference text's "protected portion ... not writeable by the VCPU" is where
//! the host tells the guest about itself: because the guest cannot write `head` or
//! `parked`, the host never has to trust a value it reads back for its own state —
//! and it reads neither back anyway: the consumer keeps its position privately.
//!
//! # Producing (guest, any vCPU, ring 3 is fine)
//!
//! [`Ring::send`](ring::Ring::send): load `tail` and `head`; if `tail - head <
//! capacity`, claim position `tail` with a `compare_exchange` on `tail` (a locked
//! `cmpxchg`), then store the record — tagged with the position's low bits — into
//! slot `tail % capacity` with one atomic 64-bit store. After publishing, a SeqCst
//! fence, then a load of `parked`: if the monitor is parked the caller issues the
//! trapping kick (one MMIO write to the range's kick address, an ioeventfd).
//!
//! **Overflow, never loss.** If the ring is full — or the producer lost
//! [`MAX_RESERVE_ATTEMPTS`](ring::MAX_RESERVE_ATTEMPTS) races for a slot, which
//! keeps `send` wait-free — it sets the event's bit in the overflow set with
//! `fetch_or`, then the word's bit in the overflow summary. Keys (device < 16,
//! queue < 16, any op) have a bit of their own; any other key sets its device's bit
//! ("something on this device"). The consumer drains the set with `swap(0)` after
//! draining the ring. So a full ring degrades to "these (device, queue, op) — or
//! this device — have pending work", exactly the level-triggered meaning a queue
//! notification has anyway; only the advisory argument is lost.
//!
//! # Consuming (host monitor thread, one per host CPU)
//!
//! [`Consumer::poll`](ring::Consumer::poll) reads the slot of its private
//! position: zero means nothing yet; a record whose check byte, operation and
//! sequence tag are right is the event; anything else is a [`Rejection`](ring::Rejection)
//! with a reason. Either way the slot is cleared and the position advances, and
//! the new position is published as `head` with Release — after the clear, so
//! the producer that refills the slot a lap later (it acquires `head` first) writes
//! after the clear. A guest scribbling on the ring can produce rejections, spurious
//! events (the host validates device and queue), or stall its own ring; it can
//! never make the consumer panic, loop or touch memory outside the ring.
//!
//! # Parking without lost wake-ups
//!
//! The monitor spins on `poll` for a budget, then [`Consumer::park`](ring::Consumer::park):
//! store `parked = PARKED`; SeqCst fence; re-check the next slot and the overflow
//! summary; if either is non-zero, clear `parked` and go on, else sleep on the
//! eventfd. The producer's side is the mirror image: publish (slot store or
//! summary `fetch_or`); SeqCst fence; load `parked`. This is Dekker's pattern: the
//! two fences are ordered in the single total order of SeqCst operations, and the
//! load after the later fence observes the store before the earlier one. So either
//! the producer sees `PARKED` and kicks, or the consumer's re-check sees the
//! producer's publication (or both: a spurious kick, which costs an exit and no
//! event). The re-check looks at only the *next* slot: a producer that claimed it
//! but has not stored yet will store, fence and see `PARKED` itself, so events
//! published behind it are covered by its kick. The eventfd remembers a kick that
//! lands before the monitor actually sleeps.
//!
//! **One kick per park.** Producers that see `PARKED` also `swap` a guest-writable
//! `kicked` word to 1; only the one that found 0 kicks. The consumer clears
//! `kicked` after waking ([`Consumer::unpark`](ring::Consumer::unpark): clear,
//! SeqCst fence, then poll). A producer that found `kicked` already set did its
//! swap before that clear, so its fence precedes the consumer's in the total order
//! and the consumer's polls see its event. A guest that forges `kicked` only stops
//! its own kicks.
//!
//! # What a guest must do
//!
//! Find the para region ([`crate::discovery::LEAF_PARA_REGION`], feature
//! [`crate::discovery::features::DOORBELLS`]), open it ([`crate::region::Region::open`]),
//! wait for `writing_allowed`, [`snapshot`](crate::region::Region::snapshot) the
//! table, build a [`Ring`] per range it will use ([`Ring::from_range`](ring::Ring::from_range) over
//! the range, with the layout [`Designation::ring_layout`](designation::Designation::ring_layout) validated), then per event `send` and, when
//! `Sent::kick`, write the kick address. Re-snapshot when the generation changes.
//!
//! # What the host must do
//!
//! Place each range (standard layout: [`Designation::standard`](designation::Designation::standard)),
//! map its protected portion read-only, zero the ring
//! ([`Consumer::reset`](ring::Consumer::reset)), publish it with
//! [`Region::designate`](crate::region::Region::designate), set `writing_allowed`,
//! and run one [`Consumer`] per ring on the monitor thread of the
//! range's host CPU: `poll` until `Empty` (bounded batches), `drain_overflow`,
//! spin, `park`, sleep on the kick eventfd, `unpark`.

pub mod bench;
pub mod designation;
pub mod geometry;
pub mod record;
pub mod ring;
mod sync;

/// What `Event::device` names: the PCI device number (bus 0) of the guest's
/// virtio device the event is for, so guest and VMM agree without a table.
/// `Event::queue` is the virtqueue index; `Op::Notify` means "new buffers".
pub mod device {
    /// A device that only counts what it receives: for tests and benchmarks
    /// of the doorbell path itself.
    pub const SINK: u8 = 0xFF;
    /// The notification benchmark's observer (shim `--notify-bench` only;
    /// rejected as an unknown device otherwise).
    pub const BENCH: u8 = 0xFE;
    /// The guest's VM-queue outbox (M5, `crate::vmq`): `Op::Notify` on queue 0
    /// means "messages with the doorbell policy are waiting".
    pub const VMQ: u8 = 0xFD;
}

pub use designation::{Designation, DesignationSlot, SourceType};
pub use geometry::RingLayout;
pub use record::{Event, Op};
pub use ring::{Consumer, Park, Pending, Polled, Ring, RingHeader, RingStatus, Sent, Via};
