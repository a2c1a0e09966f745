//! The shape of a ring in shared memory: the sizes of its parts and where a
//! validated designation says they lie.
//!
//! A leaf of its own because both sides of the protocol need it: a
//! [`Designation`](super::designation::Designation) checks its offsets against
//! these sizes, and a [`Ring`](super::ring::Ring) is built over a [`RingLayout`].

use super::record;

/// The largest ring capacity: the record's sequence tag must tell a position from
/// the one a lap earlier, so capacity stays below `2^SEQUENCE_BITS`.
pub const MAX_CAPACITY: u32 = 1 << (record::SEQUENCE_BITS - 1);

/// Size in bytes of the ring's status words (`RingStatus`) in shared memory.
pub const STATUS_SIZE: usize = 64;
/// Size in bytes of the ring's producer words (`RingHeader`) in shared memory.
pub const HEADER_SIZE: usize = 256;
/// Size in bytes of one slot.
pub const SLOT_SIZE: usize = 8;

/// Where a ring's parts lie, relative to the start of its range. Obtained only
/// through [`Designation::ring_layout`](super::designation::Designation::ring_layout),
/// so its offsets are validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Offset of the [`RingStatus`](super::ring::RingStatus).
    pub status_offset: u64,
    /// Offset of the [`RingHeader`](super::ring::RingHeader).
    pub header_offset: u64,
    /// Offset of slot 0.
    pub slots_offset: u64,
    /// Number of slots.
    pub capacity: u32,
}
