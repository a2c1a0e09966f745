//! The event record: one `u64` a guest vCPU stores into a ring slot with a single
//! atomic instruction.
//!
//! A record names *what* needs attention — a guest-local device index, a queue of
//! that device and an operation — plus a 16-bit argument whose meaning belongs to
//! the operation. The reference text (US 9,256,455, FIG. 2 block 240) puts it as
//! "the data written to the designated memory range includes information defining
//! the specific event that is to be executed".
//!
//! Bit layout (little-endian `u64`, bit 0 least significant):
//!
//! | bits    | field    | meaning                                               |
//! |---------|----------|-------------------------------------------------------|
//! | 0..8    | device   | guest-local device index                              |
//! | 8..24   | queue    | queue index within the device                         |
//! | 24..28  | op       | [`Op`]; 0 and 5..=15 are invalid                       |
//! | 28..44  | arg      | operation argument (0 unless the operation says)      |
//! | 44..56  | sequence | low 12 bits of the ring position the record is for    |
//! | 56..64  | check    | [`check_byte`] of bits 0..56                          |
//!
//! Every bit is covered, so decoding is canonical: a `u64` that decodes at all
//! re-encodes to exactly itself. Zero never decodes (its check byte would have to
//! be `0xA5`), so a cleared slot reads as "empty". The sequence tag lets the
//! consumer tell a record written for the position it is reading from a stale or
//! misplaced one; the check byte rejects most garbage (a random `u64` survives it
//! with probability 1/256, and then must still carry a valid operation and the
//! expected sequence). The host must still validate device and queue against the
//! guest's real devices: a record that decodes is well-formed, not trustworthy.

/// Bits of the ring position carried in a record.
pub const SEQUENCE_BITS: u32 = 12;
/// Mask of [`SEQUENCE_BITS`].
pub const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;

const DEVICE_SHIFT: u32 = 0;
const QUEUE_SHIFT: u32 = 8;
const OP_SHIFT: u32 = 24;
const ARG_SHIFT: u32 = 28;
const SEQUENCE_SHIFT: u32 = 44;
const CHECK_SHIFT: u32 = 56;
const BODY_MASK: u64 = (1 << CHECK_SHIFT) - 1;

/// What the host is asked to do for the (device, queue) of a record.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Generic queue notification, the doorbell twin of a virtio notify write:
    /// "the driver made new buffers available in this queue".
    Notify = 1,
    /// Receive buffers were refilled (virtio-net RX queue notification).
    RxRefill = 2,
    /// Transmit buffers were posted (virtio-net TX queue notification).
    TxKick = 3,
    /// A device-specific request; the argument carries its meaning.
    Custom = 4,
}

impl Op {
    /// Every operation, in encoding order.
    pub const ALL: [Op; 4] = [Op::Notify, Op::RxRefill, Op::TxKick, Op::Custom];

    /// Decodes the 4-bit operation field.
    #[must_use]
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::Notify),
            2 => Some(Self::RxRefill),
            3 => Some(Self::TxKick),
            4 => Some(Self::Custom),
            _ => None,
        }
    }

    /// Dense index `0..4` (used to key the overflow set).
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize - 1
    }
}

/// One event: the key (device, queue, op) and an argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    /// Guest-local device index (the order the guest and the shim agree on,
    /// e.g. the virtio-net devices in PCI enumeration order).
    pub device: u8,
    /// Queue index within the device.
    pub queue: u16,
    /// What to do.
    pub op: Op,
    /// Operation argument; 0 for the queue notifications. Advisory: when a full
    /// ring coalesces events it keeps only the key, not the argument.
    pub arg: u16,
}

impl Event {
    /// A queue notification without argument.
    #[must_use]
    pub const fn new(device: u8, queue: u16, op: Op) -> Self {
        Self {
            device,
            queue,
            op,
            arg: 0,
        }
    }

    /// The record for this event at ring position `position` (only its low
    /// [`SEQUENCE_BITS`] are kept).
    #[must_use]
    pub const fn encode(self, position: u64) -> u64 {
        let body = ((self.device as u64) << DEVICE_SHIFT)
            | ((self.queue as u64) << QUEUE_SHIFT)
            | ((self.op as u64) << OP_SHIFT)
            | ((self.arg as u64) << ARG_SHIFT)
            | ((position & SEQUENCE_MASK) << SEQUENCE_SHIFT);
        body | ((check_byte(body) as u64) << CHECK_SHIFT)
    }
}

/// A decoded record: the event and the sequence tag it carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The event.
    pub event: Event,
    /// The low [`SEQUENCE_BITS`] of the position it was written for.
    pub sequence: u16,
}

impl Record {
    /// True when this record was written for ring position `position`.
    #[must_use]
    pub const fn is_for(&self, position: u64) -> bool {
        self.sequence as u64 == position & SEQUENCE_MASK
    }

    /// Re-encodes the record (the exact `u64` it was decoded from).
    #[must_use]
    pub const fn encode(&self) -> u64 {
        self.event.encode(self.sequence as u64)
    }
}

/// Why a `u64` is not a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordError {
    /// The slot is zero: nothing was written (or it was cleared).
    Empty,
    /// The check byte does not match the body: garbage or a torn write.
    BadCheck,
    /// The operation field holds an undefined value.
    UnknownOp(u8),
}

/// The check byte of a 56-bit record body: the top byte of a multiplicative hash
/// (every body bit influences it), XOR `0xA5` so that an all-zero word is invalid.
#[must_use]
pub const fn check_byte(body: u64) -> u8 {
    let mixed = (body & BODY_MASK).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 56) as u8) ^ 0xA5
}

/// Decodes a record. Total: any `u64` gives a record or a typed error.
pub const fn decode(raw: u64) -> Result<Record, RecordError> {
    if raw == 0 {
        return Err(RecordError::Empty);
    }
    let body = raw & BODY_MASK;
    if (raw >> CHECK_SHIFT) as u8 != check_byte(body) {
        return Err(RecordError::BadCheck);
    }
    let op_raw = ((raw >> OP_SHIFT) & 0xF) as u8;
    let Some(op) = Op::from_raw(op_raw) else {
        return Err(RecordError::UnknownOp(op_raw));
    };
    Ok(Record {
        event: Event {
            device: (raw >> DEVICE_SHIFT) as u8,
            queue: (raw >> QUEUE_SHIFT) as u16,
            op,
            arg: (raw >> ARG_SHIFT) as u16,
        },
        sequence: ((raw >> SEQUENCE_SHIFT) & SEQUENCE_MASK) as u16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop::sample::select(Op::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(device: u8, queue: u16, op in op(), arg: u16, position: u64) {
            let event = Event { device, queue, op, arg };
            let raw = event.encode(position);
            let record = decode(raw).unwrap();
            prop_assert_eq!(record.event, event);
            prop_assert!(record.is_for(position));
            prop_assert_eq!(record.encode(), raw);
        }

        #[test]
        fn random_words_decode_canonically(raw: u64) {
            if let Ok(record) = decode(raw) {
                prop_assert_eq!(record.encode(), raw);
            }
        }

        #[test]
        fn single_bit_flips_are_rejected_or_canonical(device: u8, queue: u16, op in op(), arg: u16, position: u64, bit in 0u32..64) {
            let raw = Event { device, queue, op, arg }.encode(position) ^ (1 << bit);
            // A single flipped bit always changes the body or the check byte but not both
            // consistently, so it can never decode.
            prop_assert!(decode(raw).is_err());
        }
    }

    #[test]
    fn zero_is_empty() {
        assert_eq!(decode(0), Err(RecordError::Empty));
    }

    #[test]
    fn unknown_ops_are_typed_errors() {
        for op_raw in [0u64, 5, 15] {
            let body = op_raw << OP_SHIFT;
            let raw = body | ((check_byte(body) as u64) << CHECK_SHIFT);
            assert_eq!(decode(raw), Err(RecordError::UnknownOp(op_raw as u8)));
        }
    }

    #[test]
    fn sequence_tag_keeps_twelve_bits() {
        let e = Event::new(1, 2, Op::TxKick);
        let r = decode(e.encode(0x1234_5678)).unwrap();
        assert_eq!(r.sequence, 0x678);
        assert!(r.is_for(0x678));
        assert!(r.is_for(0x1678));
        assert!(!r.is_for(0x679));
    }
}
