//! M3 upcall mailboxes: how the shim tells a vCPU *why* it injected
//! [`VECTOR`], and how the guest acknowledges, per class, exactly once.
//!
//! The area at [`crate::layout::area::UPCALLS`] (offered by
//! [`crate::discovery::features::UPCALLS`] / [`crate::discovery::LEAF_UPCALLS`])
//! holds one [`SLOT_SIZE`]-byte slot per vCPU index. A slot is two arrays of
//! little-endian `u32` counters, one entry per [`Class`]:
//!
//! * `posted[c]` at [`POSTED_OFFSET`]` + 4c` — written only by the shim: the number
//!   of class-`c` upcalls it has published to this vCPU so far (wrapping). The
//!   shim raises it *before* injecting the vector, so a handler that runs finds
//!   every upcall the interrupt announces.
//! * `acked[c]` at [`ACKED_OFFSET`]` + 4c` — written only by the guest: how many it
//!   has consumed. The handler takes `posted - acked` new upcalls of a class,
//!   stores `acked = posted`, and runs the class handler once with that count.
//!
//! An interrupt that finds nothing new (it announced upcalls an earlier handler
//! run already took) is harmless: counts, not edges, carry the events, so none
//! is lost and none is delivered twice.

/// The layout version in EDX of [`crate::discovery::LEAF_UPCALLS`].
pub const VERSION: u32 = 1;
/// The interrupt vector the shim injects (the guest's `vector::UPCALL`).
pub const VECTOR: u8 = 0x33;
/// Bytes per vCPU slot (one cache line: the shim and one vCPU share it).
pub const SLOT_SIZE: u64 = 64;
/// vCPU slots in the area.
pub const MAX_VCPUS: u64 = crate::layout::area::UPCALLS_SIZE / SLOT_SIZE;
/// Offset of `posted[0]` in a slot.
pub const POSTED_OFFSET: u64 = 0;
/// Offset of `acked[0]` in a slot.
pub const ACKED_OFFSET: u64 = 32;
/// Number of classes.
pub const CLASSES: usize = 4;

/// Why the shim calls the guest. Lower values are higher priorities: the
/// guest's dispatcher runs classes in this order within one interrupt.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// A VM queue (M5) received a message.
    VmqArrival = 0,
    /// The shim changed a doorbell designation (M1).
    Redesignation = 1,
    /// The shim updated an interrupt-vCPU hint (M2).
    HintUpdate = 2,
    /// Posted at a guest's own request, for tests and benchmarks.
    Ping = 3,
}

impl Class {
    /// Every class, highest priority first.
    pub const ALL: [Self; CLASSES] = [
        Self::VmqArrival,
        Self::Redesignation,
        Self::HintUpdate,
        Self::Ping,
    ];

    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::VmqArrival),
            1 => Some(Self::Redesignation),
            2 => Some(Self::HintUpdate),
            3 => Some(Self::Ping),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::VmqArrival => "vmq_arrival",
            Self::Redesignation => "redesignation",
            Self::HintUpdate => "hint_update",
            Self::Ping => "ping",
        }
    }
}

/// Offset in the area of vCPU `vcpu`'s `posted[class]`; `None` past the area.
#[must_use]
pub const fn posted_offset(vcpu: u32, class: Class) -> Option<u64> {
    if vcpu as u64 >= MAX_VCPUS {
        return None;
    }
    Some(vcpu as u64 * SLOT_SIZE + POSTED_OFFSET + 4 * class as u64)
}

/// Offset in the area of vCPU `vcpu`'s `acked[class]`; `None` past the area.
#[must_use]
pub const fn acked_offset(vcpu: u32, class: Class) -> Option<u64> {
    if vcpu as u64 >= MAX_VCPUS {
        return None;
    }
    Some(vcpu as u64 * SLOT_SIZE + ACKED_OFFSET + 4 * class as u64)
}

/// Most pings one [`crate::hypercall::Call::UpcallPing`] may post.
pub const PING_MAX: u64 = 1 << 16;
/// Most pings one [`crate::hypercall::Call::UpcallStorm`] may ask for.
pub const STORM_MAX: u64 = 1 << 20;

/// Encodes the RBX of [`crate::hypercall::Call::UpcallStorm`]: `count` pings,
/// one every `interval_us` µs.
#[must_use]
pub const fn storm_arg(count: u32, interval_us: u32) -> u64 {
    (interval_us as u64) << 32 | count as u64
}

/// Decodes [`storm_arg`]: (count, interval in µs).
#[must_use]
pub const fn storm_from_arg(arg: u64) -> (u32, u32) {
    (arg as u32, (arg >> 32) as u32)
}

const _: () = assert!(ACKED_OFFSET + 4 * CLASSES as u64 <= SLOT_SIZE);
const _: () = assert!(POSTED_OFFSET + 4 * CLASSES as u64 <= ACKED_OFFSET);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_trip_in_priority_order() {
        for (i, c) in Class::ALL.iter().enumerate() {
            assert_eq!(Class::from_raw(i as u32), Some(*c));
        }
        assert!(Class::VmqArrival < Class::Ping);
        assert_eq!(Class::from_raw(4), None);
    }

    #[test]
    fn slots_stay_inside_the_area() {
        let last = MAX_VCPUS as u32 - 1;
        let end = acked_offset(last, Class::Ping).unwrap() + 4;
        assert!(end <= crate::layout::area::UPCALLS_SIZE);
        assert_eq!(posted_offset(last + 1, Class::Ping), None);
        assert_eq!(acked_offset(1, Class::VmqArrival), Some(64 + 32));
    }

    #[test]
    fn storm_argument_round_trips() {
        assert_eq!(storm_from_arg(storm_arg(5000, 100)), (5000, 100));
    }
}
