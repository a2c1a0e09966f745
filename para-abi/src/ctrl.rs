//! M4 shadowed control flags: the per-vCPU control blocks.
//!
//! The area at [`crate::layout::area::CTRL`] holds two pages:
//!
//! - the **mask page** (host-owned, mapped read-only for the guest: a guest store
//!   there is an MMIO exit the shim rejects and counts) with one mask record ([`mask`]) per
//!   vCPU: a seqlock `version`, the **owned** mask (the guest writes those flags to
//!   the real register itself) and the **shadowed** mask (the guest writes those to
//!   its shadow word, no exit). A flag in neither mask traps: the guest asks the
//!   shim with [`crate::hypercall`] `CtrlWrite`.
//! - the **shadow page** (guest-writable) with one shadow record ([`shadow`]) per vCPU: the
//!   shadow value word (one bit per [`Flag`]) and a counter of owned
//!   (real-register) writes the guest reports, for statistics only.
//!
//! The shim changes masks only on the vCPU's own thread while that vCPU is out of
//! the guest (at an exit), after it has consumed the shadow word. A guest write
//! therefore follows [`write_rule`]: read the masks under the seqlock, do the
//! write, then re-read `version`: if it moved, an exit changed the rule in
//! between and the (idempotent) write is redone under the new rule. A write made
//! to the shadow before the exit was consumed at that exit; one made after the
//! exit under the old rule is redone; none is lost.

/// Layout version in EDX of [`crate::discovery::LEAF_CTRL`]. Version 2 adds
/// the wait page ([`wait`]).
pub const VERSION: u32 = 2;
/// Bytes of the area the shim maps: the mask page, the shadow page and the wait page.
pub const AREA_BYTES: u64 = 3 * PAGE;
/// Page size of the two pages.
pub const PAGE: u64 = 0x1000;
/// Offset of the mask page (read-only to the guest).
pub const MASK_PAGE: u64 = 0;
/// Offset of the shadow page (guest-writable).
pub const SHADOW_PAGE: u64 = PAGE;
/// Offset of the wait page (read-only to the guest; see [`wait`]).
pub const WAIT_PAGE: u64 = 2 * PAGE;
/// Bytes per vCPU record in either page: a cache line, so vCPUs do not share one.
pub const RECORD_BYTES: u64 = 64;
/// vCPUs the area describes.
pub const MAX_VCPUS: u32 = (PAGE / RECORD_BYTES) as u32;

/// Field offsets in a mask record (all little-endian).
pub mod mask {
    /// u32 seqlock: odd while the shim rewrites the masks.
    pub const VERSION: u64 = 0;
    /// u64 owned mask.
    pub const OWNED: u64 = 8;
    /// u64 shadowed mask.
    pub const SHADOWED: u64 = 16;
}

/// Field offsets in a shadow record.
pub mod shadow {
    /// u64 shadow values, one bit per flag.
    pub const VALUES: u64 = 0;
    /// u64 owned (real-register) writes the guest made, as it reports them.
    pub const OWNED_WRITES: u64 = 8;
    /// u64 guest TSC when this vCPU's application last handed a frame to its
    /// stack (latency breakdown only; the shim copies it, never trusts it).
    pub const STAMP_APP_TX: u64 = 16;
    /// u64 guest TSC when this vCPU last notified its NIC's TX queue.
    pub const STAMP_NOTIFY: u64 = 24;
}

/// The exitless wait (wait page, [`WAIT_PAGE`]): a vCPU that has nothing to do
/// until its NIC 0 receive queue has work sleeps with **one** exit and no ring-0
/// code, instead of a halt kernel call and an RX interrupt.
///
/// The protocol, per wait:
/// 1. Once: the guest sets [`Flag::Nic0RxQuiet`] (shadowed, no exit), so the
///    shim raises no RX MSI for it.
/// 2. It reads [`wait::RX_SEQ`] (host-written; bumped after every batch of frames the
///    shim puts in NIC 0's RX used ring), then checks its used ring.
/// 3. Nothing there: it stores one 8-byte [`wait::encode_request`] value (the low 32
///    bits of the sequence it read, its timeout) at [`wait::REQUEST`]. The page is
///    mapped read-only, so the store is an MMIO exit straight from ring 3.
/// 4. The shim blocks that vCPU's thread until the sequence moves away from the
///    value given, the vCPU is kicked (an upcall or a stop for it), or the
///    timeout passes (the guest's own timer interrupts cannot wake a thread
///    blocked in user space, so the guest must pass its next deadline), then
///    resumes the guest after the store, in ring 3, with the frame in its ring.
///
/// A vCPU that queued frames on NIC 0's TX ring without notifying the queue
/// stores its request at [`wait::REQUEST_TX`] instead: the wait's exit is then the
/// notification, and the shim moves those frames on before it holds the vCPU
/// (a sender about to wait needs no doorbell of its own).
///
/// A frame that lands between steps 2 and 3 moved the sequence: the wait returns
/// at once. Other interrupts for the vCPU (IPIs, other devices) are seen at the
/// latest after the timeout or [`wait::MAX_BLOCK_US`]; a vCPU that waits for those
/// must halt instead.
pub mod wait {
    /// u64, host-written: NIC 0 RX batches pushed so far.
    pub const RX_SEQ: u64 = 0;
    /// Latency-breakdown stamps of the last frame pushed into NIC 0's RX ring,
    /// host-written, each a u64 on **this guest's TSC** (the shim converts), in
    /// the order of [`Stamp`]; 0 = unknown.
    pub const STAMPS: u64 = 64;
    /// The guest's request word.
    pub const REQUEST: u64 = 0x800;
    /// The same request, carrying a TX notification for NIC 0: the guest queued
    /// TX buffers it did not notify. With [`REQUEST`], the only offsets a guest
    /// may store to.
    pub const REQUEST_TX: u64 = 0x808;
    /// Timeout meaning "until work or a kick" (bounded by [`MAX_BLOCK_US`]).
    pub const NO_DEADLINE: u32 = u32::MAX;
    /// Longest timeout a request may carry (10 s); longer ones are refused.
    pub const MAX_TIMEOUT_US: u32 = 10_000_000;
    /// Longest single block the shim allows (100 ms): a guest that gave no
    /// deadline, or a long one, is resumed then and waits again.
    pub const MAX_BLOCK_US: u32 = 100_000;

    /// The stamps of one frame's trip, in trip order.
    #[repr(u8)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Stamp {
        /// The sender's application handed the frame to its stack.
        SenderApp = 0,
        /// The sender notified its TX queue.
        SenderNotify = 1,
        /// A host thread saw the notification (monitor or NIC worker).
        HostSaw = 2,
        /// The NIC worker took the frame off the sender's TX ring.
        TxPopped = 3,
        /// The frame is in this guest's RX used ring.
        RxPushed = 4,
    }

    impl Stamp {
        pub const ALL: [Self; 5] = [
            Self::SenderApp,
            Self::SenderNotify,
            Self::HostSaw,
            Self::TxPopped,
            Self::RxPushed,
        ];

        /// Offset of this stamp in the wait page.
        #[must_use]
        pub const fn offset(self) -> u64 {
            STAMPS + 8 * self as u64
        }
    }

    /// A decoded wait request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Request {
        /// The low 32 bits of [`RX_SEQ`] the guest saw before it checked its ring.
        pub token: u32,
        /// Microseconds from the exit; `None`: no deadline.
        pub timeout_us: Option<u32>,
        /// Stored at [`REQUEST_TX`]: NIC 0's TX queue has work to take first.
        pub tx: bool,
    }

    /// Why a store to the wait page is refused (the vCPU resumes at once).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum WaitError {
        /// Not at [`REQUEST`] or [`REQUEST_TX`], or not one aligned 8-byte store.
        BadStore,
        /// A timeout above [`MAX_TIMEOUT_US`] that is not [`NO_DEADLINE`].
        BadTimeout,
    }

    /// The request value: token in bits 0..32, timeout (µs) in bits 32..64.
    #[must_use]
    pub const fn encode_request(token: u32, timeout_us: Option<u32>) -> u64 {
        let t = match timeout_us {
            Some(us) if us <= MAX_TIMEOUT_US => us,
            Some(_) => MAX_TIMEOUT_US,
            None => NO_DEADLINE,
        };
        token as u64 | (t as u64) << 32
    }

    /// Where a request is stored: [`REQUEST_TX`] when it carries a TX
    /// notification.
    #[must_use]
    pub const fn request_offset(tx: bool) -> u64 {
        if tx { REQUEST_TX } else { REQUEST }
    }

    /// Decodes and validates a store of `data` at wait-page offset `offset`.
    pub fn decode_request(offset: u64, data: &[u8]) -> Result<Request, WaitError> {
        let Ok(bytes) = <[u8; 8]>::try_from(data) else {
            return Err(WaitError::BadStore);
        };
        let tx = match offset {
            REQUEST => false,
            REQUEST_TX => true,
            _ => return Err(WaitError::BadStore),
        };
        let v = u64::from_le_bytes(bytes);
        let token = v as u32;
        let t = (v >> 32) as u32;
        let timeout_us = match t {
            NO_DEADLINE => None,
            us if us <= MAX_TIMEOUT_US => Some(us),
            _ => return Err(WaitError::BadTimeout),
        };
        Ok(Request {
            token,
            timeout_us,
            tx,
        })
    }
}

/// Guest-physical address of vCPU `vcpu`'s mask record, from the area base.
#[must_use]
pub const fn mask_record(base: u64, vcpu: u32) -> u64 {
    base + MASK_PAGE + vcpu as u64 * RECORD_BYTES
}

/// Guest-physical address of vCPU `vcpu`'s shadow record, from the area base.
#[must_use]
pub const fn shadow_record(base: u64, vcpu: u32) -> u64 {
    base + SHADOW_PAGE + vcpu as u64 * RECORD_BYTES
}

/// The control flags. The value is the bit number in every mask and shadow word
/// and the id in `CtrlWrite` / `CtrlRead` hypercalls.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// CR0.MP (bit 1, SDM vol 3 §2.5): WAIT/FWAIT honour TS.
    Cr0Mp = 0,
    /// CR0.TS (bit 3, SDM vol 3 §2.5): the next x87/SSE instruction raises #NM.
    Cr0Ts = 1,
    /// No MSI for NIC 0's receive queue while set (the guest polls it).
    Nic0RxQuiet = 2,
    /// No MSI for NIC 0's transmit queue while set.
    Nic0TxQuiet = 3,
    /// "Keep polling my doorbell range": a preference for the M1 monitor.
    PollDoorbells = 4,
    /// The shim logs this vCPU's exits.
    Trace = 5,
}

impl Flag {
    pub const ALL: [Self; 6] = [
        Self::Cr0Mp,
        Self::Cr0Ts,
        Self::Nic0RxQuiet,
        Self::Nic0TxQuiet,
        Self::PollDoorbells,
        Self::Trace,
    ];

    /// Decodes a flag id; `None` for ids this ABI does not define.
    #[must_use]
    pub const fn from_id(id: u64) -> Option<Self> {
        Some(match id {
            0 => Self::Cr0Mp,
            1 => Self::Cr0Ts,
            2 => Self::Nic0RxQuiet,
            3 => Self::Nic0TxQuiet,
            4 => Self::PollDoorbells,
            5 => Self::Trace,
            _ => return None,
        })
    }

    /// This flag's bit in mask and shadow words.
    #[must_use]
    pub const fn bit(self) -> u64 {
        1 << self as u8
    }

    /// True for flags that live in a real register (CR0).
    #[must_use]
    pub const fn is_hardware(self) -> bool {
        HARDWARE & self.bit() != 0
    }

    /// The CR0 bit a hardware flag stands for.
    #[must_use]
    pub const fn cr0_bit(self) -> Option<u64> {
        match self {
            Self::Cr0Mp => Some(CR0_MP),
            Self::Cr0Ts => Some(CR0_TS),
            _ => None,
        }
    }
}

/// CR0.MP (SDM vol 3 §2.5, figure 2-7).
pub const CR0_MP: u64 = 1 << 1;
/// CR0.TS.
pub const CR0_TS: u64 = 1 << 3;
/// Every flag bit the ABI defines.
pub const KNOWN: u64 = (1 << Flag::ALL.len()) - 1;
/// Flags backed by a real register: only these may be owned.
pub const HARDWARE: u64 = Flag::Cr0Mp.bit() | Flag::Cr0Ts.bit();

/// How a guest writes a flag under masks (owned, shadowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Write the real register (kernel call in this guest).
    Owned,
    /// Store into the shadow word; no exit.
    Shadowed,
    /// Ask the shim (`CtrlWrite` hypercall, one exit).
    Trap,
}

/// The rule for `flag` under `owned` and `shadowed` masks. Owned wins (a valid
/// mask pair never has both; see [`Masks::validate`]).
#[must_use]
pub const fn write_rule(owned: u64, shadowed: u64, flag: Flag) -> Rule {
    if owned & flag.bit() != 0 {
        Rule::Owned
    } else if shadowed & flag.bit() != 0 {
        Rule::Shadowed
    } else {
        Rule::Trap
    }
}

/// A pair of masks as the shim publishes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Masks {
    pub owned: u64,
    pub shadowed: u64,
}

/// Why a mask pair is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskError {
    /// A bit names no flag.
    UnknownFlag,
    /// A virtual flag cannot be owned: there is no register to write.
    OwnedVirtual,
    /// A flag cannot be both owned and shadowed.
    Overlap,
}

impl Masks {
    /// Checks a mask pair before the shim publishes it.
    pub const fn validate(self) -> Result<Self, MaskError> {
        if (self.owned | self.shadowed) & !KNOWN != 0 {
            Err(MaskError::UnknownFlag)
        } else if self.owned & !HARDWARE != 0 {
            Err(MaskError::OwnedVirtual)
        } else if self.owned & self.shadowed != 0 {
            Err(MaskError::Overlap)
        } else {
            Ok(self)
        }
    }

    /// The `CtrlSetMasks` hypercall argument: owned in bits 0..32, shadowed in 32..64.
    #[must_use]
    pub const fn encode(self) -> u64 {
        (self.owned & 0xFFFF_FFFF) | (self.shadowed << 32)
    }

    /// Decodes and validates a `CtrlSetMasks` argument.
    pub const fn decode(arg: u64) -> Result<Self, MaskError> {
        Self {
            owned: arg & 0xFFFF_FFFF,
            shadowed: arg >> 32,
        }
        .validate()
    }
}

/// Why a `CtrlWrite` argument is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteError {
    UnknownFlag,
    /// The value is neither 0 nor 1, or reserved bits are set.
    BadValue,
}

/// The `CtrlWrite` argument: flag id in bits 0..8, value in bit 8.
#[must_use]
pub const fn encode_write(flag: Flag, value: bool) -> u64 {
    flag as u64 | (value as u64) << 8
}

/// Decodes a `CtrlWrite` argument.
pub const fn decode_write(arg: u64) -> Result<(Flag, bool), WriteError> {
    if arg >> 9 != 0 {
        return Err(WriteError::BadValue);
    }
    match Flag::from_id(arg & 0xFF) {
        Some(f) => Ok((f, arg & 0x100 != 0)),
        None => Err(WriteError::UnknownFlag),
    }
}

/// `CtrlQuery` selectors (RBX): what the shim answers in RAX.
pub mod query {
    /// KVM `exits` summed over the guest's vCPUs (includes this call's own exit).
    pub const KVM_EXITS: u64 = 0;
    /// The flag values the shim holds for this vCPU (after applying the shadow).
    pub const HOST_VALUES: u64 = 1;
    /// Trapping writes (`CtrlWrite`) the shim handled for this vCPU.
    pub const HYPERCALL_WRITES: u64 = 2;
    /// Shadow changes the shim observed for this vCPU.
    pub const SHADOW_CHANGES: u64 = 3;
    /// Rejected inputs for the whole guest's control blocks.
    pub const REJECTS: u64 = 4;
    /// MSIs withheld because a queue's quiet flag was set (whole guest).
    pub const SUPPRESSED_MSIS: u64 = 5;
    /// Exits the shim traced because the trace flag was set (whole guest).
    pub const TRACED_EXITS: u64 = 6;
}

/// Reads a mask record consistently: `read(offset)` loads the u64 at an offset
/// of the record (u32 version in its low half). Returns `(version, masks)` with an
/// even version that did not move across the reads; `None` after `tries` attempts
/// saw a writer (the caller may treat that as "trap").
pub fn read_masks(mut read: impl FnMut(u64) -> u64, tries: u32) -> Option<(u32, Masks)> {
    for _ in 0..tries {
        let v1 = read(mask::VERSION) as u32;
        if v1 & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        let m = Masks {
            owned: read(mask::OWNED),
            shadowed: read(mask::SHADOWED),
        };
        let v2 = read(mask::VERSION) as u32;
        if v1 == v2 {
            return Some((v1, m));
        }
    }
    None
}

/// What the guest's write protocol ([`write()`]) needs from its surroundings.
pub trait Port {
    type Error;
    /// The u64 at `offset` of this vCPU's mask record (the u32 version is the
    /// low half at [`mask::VERSION`]).
    fn mask_load(&mut self, offset: u64) -> u64;
    /// Sets `flag` in this vCPU's shadow word (one locked RMW).
    fn shadow_set(&mut self, flag: Flag, value: bool);
    /// Writes the real register.
    fn owned_write(&mut self, flag: Flag, value: bool) -> Result<(), Self::Error>;
    /// The `CtrlWrite` hypercall.
    fn trap_write(&mut self, flag: Flag, value: bool) -> Result<(), Self::Error>;
    /// The masks changed under a write, which is now redone.
    fn retried(&mut self) {}
}

/// Seqlock attempts before a writer gives up on the masks and traps.
pub const MASK_TRIES: u32 = 64;

/// Sets `flag` to `value` by the rule of the current masks; returns the path.
///
/// The shim changes masks only at an exit of this vCPU, after taking its shadow.
/// So: read the masks, write, re-read the version; if it moved, an exit came in
/// between and the (idempotent) write is redone under the new rule. A trapped
/// write is applied by the shim whatever the masks say and needs no re-check.
pub fn write<P: Port>(p: &mut P, flag: Flag, value: bool) -> Result<Rule, P::Error> {
    loop {
        let Some((ver, m)) = read_masks(|off| p.mask_load(off), MASK_TRIES) else {
            p.trap_write(flag, value)?;
            return Ok(Rule::Trap);
        };
        let rule = write_rule(m.owned, m.shadowed, flag);
        match rule {
            Rule::Owned => p.owned_write(flag, value)?,
            Rule::Shadowed => p.shadow_set(flag, value),
            Rule::Trap => {
                p.trap_write(flag, value)?;
                return Ok(Rule::Trap);
            }
        }
        if p.mask_load(mask::VERSION) as u32 == ver {
            return Ok(rule);
        }
        p.retried();
    }
}

/// The shadow word with `flag` set to `value`.
#[must_use]
pub const fn with_flag(word: u64, flag: Flag, value: bool) -> u64 {
    if value {
        word | flag.bit()
    } else {
        word & !flag.bit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const _: () = {
        assert!(mask_record(0, MAX_VCPUS - 1) + RECORD_BYTES <= SHADOW_PAGE);
        assert!(shadow_record(0, MAX_VCPUS - 1) + RECORD_BYTES <= WAIT_PAGE);
        assert!(shadow::STAMP_NOTIFY + 8 <= RECORD_BYTES);
        assert!(wait::Stamp::RxPushed.offset() + 8 <= wait::REQUEST);
        assert!(wait::REQUEST + 8 <= wait::REQUEST_TX && wait::REQUEST_TX + 8 <= PAGE);
        assert!(WAIT_PAGE + PAGE == AREA_BYTES);
        assert!(AREA_BYTES <= crate::layout::area::CTRL_SIZE);
        assert!(KNOWN == 0x3F);
    };

    #[test]
    fn hostile_masks_are_refused() {
        let m = |owned, shadowed| Masks { owned, shadowed }.validate();
        assert_eq!(m(0, 1 << 6), Err(MaskError::UnknownFlag));
        assert_eq!(m(Flag::Trace.bit(), 0), Err(MaskError::OwnedVirtual));
        assert_eq!(m(CR0_MP >> 1, 1), Err(MaskError::Overlap));
        assert_eq!(
            m(Flag::Cr0Ts.bit(), Flag::Cr0Mp.bit() | Flag::Trace.bit()).map(|_| ()),
            Ok(())
        );
        assert_eq!(Masks::decode(u64::MAX), Err(MaskError::UnknownFlag));
    }

    #[test]
    fn rules_follow_the_masks() {
        let f = Flag::Cr0Mp;
        assert_eq!(write_rule(f.bit(), 0, f), Rule::Owned);
        assert_eq!(write_rule(0, f.bit(), f), Rule::Shadowed);
        assert_eq!(write_rule(0, 0, f), Rule::Trap);
        assert_eq!(write_rule(!f.bit(), !f.bit(), f), Rule::Trap);
    }

    #[test]
    fn seqlock_retries_while_odd_and_gives_up() {
        assert_eq!(read_masks(|_| 1, 5), None);
        let mut n = 0u32;
        // The version moves once between the two reads, then settles.
        let r = read_masks(
            |off| match off {
                mask::VERSION => {
                    n += 1;
                    if n == 1 { 2 } else { 4 }
                }
                _ => 7,
            },
            5,
        );
        assert_eq!(
            r,
            Some((
                4,
                Masks {
                    owned: 7,
                    shadowed: 7
                }
            ))
        );
    }

    #[test]
    fn hostile_wait_stores_are_refused() {
        use wait::{REQUEST, WaitError, decode_request, encode_request};
        let ok = encode_request(7, Some(250)).to_le_bytes();
        assert_eq!(
            decode_request(REQUEST, &ok),
            Ok(wait::Request {
                token: 7,
                timeout_us: Some(250),
                tx: false,
            })
        );
        assert_eq!(
            decode_request(wait::request_offset(true), &ok),
            Ok(wait::Request {
                token: 7,
                timeout_us: Some(250),
                tx: true,
            })
        );
        // Wrong width, wrong place, the host's own words.
        assert_eq!(decode_request(REQUEST, &ok[..4]), Err(WaitError::BadStore));
        assert_eq!(decode_request(REQUEST, &[]), Err(WaitError::BadStore));
        assert_eq!(decode_request(REQUEST + 16, &ok), Err(WaitError::BadStore));
        assert_eq!(
            decode_request(wait::REQUEST_TX + 4, &ok[..4]),
            Err(WaitError::BadStore)
        );
        assert_eq!(decode_request(wait::RX_SEQ, &ok), Err(WaitError::BadStore));
        assert_eq!(decode_request(REQUEST + 1, &ok), Err(WaitError::BadStore));
        // A timeout beyond the limit that is not "none".
        let long = (u64::from(wait::MAX_TIMEOUT_US) + 1) << 32;
        assert_eq!(
            decode_request(REQUEST, &long.to_le_bytes()),
            Err(WaitError::BadTimeout)
        );
        let none = encode_request(1, None).to_le_bytes();
        assert_eq!(decode_request(REQUEST, &none).unwrap().timeout_us, None);
        // The encoder never produces what the decoder refuses.
        let clamped = encode_request(0, Some(u32::MAX - 1)).to_le_bytes();
        assert_eq!(
            decode_request(REQUEST, &clamped).unwrap().timeout_us,
            Some(wait::MAX_TIMEOUT_US)
        );
    }

    proptest! {
        #[test]
        fn wait_decoder_accepts_only_what_the_encoder_makes(v: u64) {
            if let Ok(r) = wait::decode_request(wait::REQUEST, &v.to_le_bytes()) {
                prop_assert_eq!(wait::encode_request(r.token, r.timeout_us), v);
            }
        }

        #[test]
        fn write_arguments_round_trip(id in 0u8..6, v: bool) {
            let f = Flag::from_id(u64::from(id)).unwrap();
            prop_assert_eq!(decode_write(encode_write(f, v)), Ok((f, v)));
            prop_assert_eq!(f as u8, id);
        }

        #[test]
        fn write_decoder_never_accepts_garbage(arg: u64) {
            if let Ok((f, v)) = decode_write(arg) {
                prop_assert_eq!(encode_write(f, v), arg);
            }
        }

        #[test]
        fn valid_masks_round_trip(owned in 0u64..4, shadowed in 0u64..64) {
            let m = Masks { owned, shadowed: shadowed & !owned };
            prop_assert_eq!(Masks::decode(m.encode()), Ok(m));
        }

        #[test]
        fn mask_decoder_accepts_only_valid_pairs(arg: u64) {
            if let Ok(m) = Masks::decode(arg) {
                prop_assert_eq!(m.encode(), arg);
                prop_assert_eq!(m.owned & m.shadowed, 0);
                prop_assert_eq!(m.owned & !HARDWARE, 0);
                prop_assert_eq!((m.owned | m.shadowed) & !KNOWN, 0);
            }
        }

        #[test]
        fn with_flag_touches_one_bit(word: u64, id in 0u8..6, v: bool) {
            let f = Flag::from_id(u64::from(id)).unwrap();
            let w = with_flag(word, f, v);
            prop_assert_eq!(w & !f.bit(), word & !f.bit());
            prop_assert_eq!(w & f.bit() != 0, v);
        }
    }
}
