//! M5 VM queues: guests send byte ranges (whole pages when remapped) to each other.
//!
//! The area at [`crate::layout::area::VMQ`] (offered by
//! [`crate::discovery::features::VM_QUEUES`], leaf [`crate::discovery::LEAF_VMQ`]) is
//! laid out as:
//!
//! | offset            | what                                                         |
//! |-------------------|--------------------------------------------------------------|
//! | [`HEADER`]        | [`Header`]: this guest's id, the geometry below               |
//! | [`DIRECTORY`]     | [`DirRecord`]s: every guest's name and id (shim-written)      |
//! | [`INBOX`]         | the inbox ring: shim produces [`Arrival`]s, guest consumes    |
//! | [`OUTBOX`]        | the outbox ring: guest produces [`Message`]s, shim consumes   |
//! | [`WINDOW`]        | the receive window: where arrivals' bytes appear             |
//!
//! Both rings are single-producer single-consumer: a `produced` and a `consumed`
//! u32 counter on separate cache lines (free-running, wrapping), then
//! [`RING_ENTRIES`] entries of [`ENTRY_SIZE`] bytes. The occupancy of the inbox is
//! `produced - consumed`, a plain read: the guest needs no exit to learn it.
//!
//! Outbox entries carry a status byte the shim writes back when it has acted on
//! the message ([`SendStatus`]); the guest reuses the slot after `consumed` passes it.
//! Arrivals name bytes in the receive window; when the guest advances the inbox's
//! `consumed` past an arrival, its window pages go back to the shim.

/// Layout version in EDX of [`crate::discovery::LEAF_VMQ`].
pub const VERSION: u32 = 2;
/// Magic in [`Header::magic`]: "VMQ1".
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMQ1");

/// Offsets inside the area.
pub const HEADER: u64 = 0;
pub const DIRECTORY: u64 = 0x800;
pub const INBOX: u64 = 0x1000;
pub const OUTBOX: u64 = 0x9000;
/// The receive window starts on a 2 MiB boundary so 2 MiB pages can be remapped there.
pub const WINDOW: u64 = 0x20_0000;
/// Bytes of receive window (16384 4 KiB pages, 32 2 MiB pages).
pub const WINDOW_SIZE: u64 = 64 << 20;
/// Bytes the shim maps for the whole area.
pub const AREA_SIZE: u64 = WINDOW + WINDOW_SIZE;

/// The kick page, right after the area: no memory is behind it, so a guest
/// store there is an exit the shim sees (an MMIO write) made from ring 3 with
/// no kernel code. The stored u64 is a [`Kick`]: deliver my outbox now, and
/// maybe block me until something arrives. A guest about to idle uses it in
/// place of halting (a halt never reaches the shim here), so lazily posted
/// messages leave with the one exit the wait costs anyway.
pub const KICK: u64 = AREA_SIZE;
pub const KICK_SIZE: u64 = PAGE;

/// What a guest stores at [`KICK`] (8 bytes, little endian): bits 0..24 the
/// longest wait in µs, bit 32 [`Kick::WAIT`], bit 33 [`Kick::FULL`], bit 34
/// [`Kick::DONE`] ([`UntilDone::Yes`]), bit 35 [`Kick::HELD_DONE`]
/// ([`UntilDone::IfHeld`]), bits 48..64 `seen`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kick {
    /// Block until more than `seen` arrivals wait in the inbox, or (see
    /// `done`) every posted message has been acted on, or `max_us` passes
    /// (0: the shim's longest wait).
    pub wait: bool,
    /// The outbox is full: the only reason a lazy sender flushes (counted).
    pub full: bool,
    pub done: UntilDone,
    pub seen: u16,
    /// At most `MAX_US`.
    pub max_us: u32,
}

/// Whether a [`Kick`] wait also ends once every message the guest posted
/// has been acted on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UntilDone {
    /// No: only an arrival, the deadline or the guest's end.
    #[default]
    No,
    /// Yes (a sender waiting for its outbox to move).
    Yes,
    /// Only if this exit's own delivery held something back
    /// (`Message::HOLD`). An immediate sender with nothing to do until its
    /// next arrival sends its flush as such a wait: one exit delivers and
    /// waits, and it never sleeps behind its own held message.
    IfHeld,
}

impl Kick {
    pub const WAIT: u64 = 1 << 32;
    pub const FULL: u64 = 1 << 33;
    pub const DONE: u64 = 1 << 34;
    pub const HELD_DONE: u64 = 1 << 35;
    pub const MAX_US: u32 = (1 << 24) - 1;

    #[must_use]
    pub const fn encode(&self) -> u64 {
        let us = if self.max_us > Self::MAX_US {
            Self::MAX_US
        } else {
            self.max_us
        };
        let mut v = us as u64 | (self.seen as u64) << 48;
        if self.wait {
            v |= Self::WAIT;
        }
        if self.full {
            v |= Self::FULL;
        }
        v |= match self.done {
            UntilDone::No => 0,
            UntilDone::Yes => Self::DONE,
            UntilDone::IfHeld => Self::HELD_DONE,
        };
        v
    }

    /// Any value decodes; unknown bits are ignored ([`Kick::DONE`] wins
    /// over [`Kick::HELD_DONE`]).
    #[must_use]
    pub const fn decode(v: u64) -> Self {
        Self {
            wait: v & Self::WAIT != 0,
            full: v & Self::FULL != 0,
            done: if v & Self::DONE != 0 {
                UntilDone::Yes
            } else if v & Self::HELD_DONE != 0 {
                UntilDone::IfHeld
            } else {
                UntilDone::No
            },
            seen: (v >> 48) as u16,
            max_us: (v as u32) & Self::MAX_US,
        }
    }
}

const _: () = assert!(AREA_SIZE <= crate::layout::area::VMQ_SIZE);
const _: () = assert!(crate::layout::area::VMQ + KICK + KICK_SIZE <= crate::layout::area::DIRECT);
const _: () = assert!(crate::layout::area::VMQ + AREA_SIZE <= crate::layout::area::DIRECT);
const _: () = assert!(WINDOW.is_multiple_of(HUGE_PAGE));

/// Small and huge page sizes a message may be remapped at.
pub const PAGE: u64 = 0x1000;
pub const HUGE_PAGE: u64 = 0x20_0000;

/// Directory capacity and record size.
pub const DIR_ENTRIES: usize = 32;
pub const DIR_RECORD_SIZE: usize = 32;
/// Bytes of a guest name in the directory (NUL-padded, not necessarily terminated).
pub const NAME_LEN: usize = 24;
const _: () = assert!(DIRECTORY as usize + DIR_ENTRIES * DIR_RECORD_SIZE <= INBOX as usize);

/// Ring geometry (inbox and outbox alike). 512 entries: a 4 KiB stream
/// between three guests moved 2.4x more with 128 than with 64, since every
/// full ring makes the pipeline's guests take turns.
pub const RING_ENTRIES: u32 = 512;
pub const ENTRY_SIZE: usize = 32;
/// Offsets inside a ring.
pub const RING_PRODUCED: u64 = 0;
pub const RING_CONSUMED: u64 = 64;
pub const RING_ENTRIES_AT: u64 = 128;
/// Guest-written u32 on the inbox's `consumed` line: non-zero asks for no
/// arrival notification (upcall or MSI) while the guest is not in a
/// kick-page wait. A guest that only ever idles in such waits sets it: the
/// wait itself sees arrivals, and an upcall to a running vCPU is an exit.
/// Zero (the default) keeps the notification, for guests that halt.
pub const INBOX_QUIET: u64 = INBOX + RING_CONSUMED + 4;
const _: () = assert!(INBOX_QUIET + 4 <= INBOX + RING_ENTRIES_AT);
const _: () = assert!(INBOX + RING_ENTRIES_AT + RING_ENTRIES as u64 * ENTRY_SIZE as u64 <= OUTBOX);
const _: () = assert!(OUTBOX + RING_ENTRIES_AT + RING_ENTRIES as u64 * ENTRY_SIZE as u64 <= WINDOW);

/// Largest message in bytes (one 2 MiB page, or 512 small pages).
pub const MAX_MESSAGE: u32 = HUGE_PAGE as u32;

/// The interrupt vector announcing that a guest's inbox went from empty to
/// non-empty (until M3 upcalls carry it).
pub const ARRIVAL_VECTOR: u8 = 0x35;

/// Byte offset of ring entry `index` (wrapping counter) inside its ring.
#[must_use]
pub const fn entry_offset(index: u32) -> u64 {
    RING_ENTRIES_AT + (index % RING_ENTRIES) as u64 * ENTRY_SIZE as u64
}

/// Entries a ring holds given its counters, or `None` when they are inconsistent
/// (a consumer ahead of the producer, or more than [`RING_ENTRIES`] outstanding).
#[must_use]
pub const fn occupancy(produced: u32, consumed: u32) -> Option<u32> {
    let n = produced.wrapping_sub(consumed);
    if n > RING_ENTRIES { None } else { Some(n) }
}

/// When the shim delivers a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Policy {
    /// The guest follows the send with [`crate::hypercall::Call::VmqFlush`]; the shim
    /// delivers before the guest resumes.
    Immediate = 0,
    /// The message waits in the outbox until the sender's next exit of any kind.
    Lazy = 1,
    /// An M1 doorbell event makes the shim's monitor thread deliver it.
    Doorbell = 2,
}

impl Policy {
    #[must_use]
    pub const fn from_raw(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Immediate),
            1 => Some(Self::Lazy),
            2 => Some(Self::Doorbell),
            _ => None,
        }
    }
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Immediate => "immediate",
            Self::Lazy => "lazy",
            Self::Doorbell => "doorbell",
        }
    }
}

/// How the bytes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Transfer {
    /// The shim copies the bytes into the destination's receive window.
    Copy = 0,
    /// The shim exchanges the sender's pages with free pages of the destination's
    /// receive window: the destination gets the sender's pages, the sender gets
    /// zeroed pages in their place. `addr` and the covered range must be
    /// page-aligned at the message's page size.
    Remap = 1,
}

impl Transfer {
    #[must_use]
    pub const fn from_raw(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Copy),
            1 => Some(Self::Remap),
            _ => None,
        }
    }
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Remap => "remap",
        }
    }
}

/// What the shim wrote back into an outbox entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SendStatus {
    /// Not yet acted on (the guest writes this when it posts).
    Pending = 0,
    Delivered = 1,
    /// The range is not all inside the sender's RAM or its live receive window.
    OutsideRam = 2,
    /// The range names receive-window pages the sender already gave back.
    NotOwned = 3,
    /// No guest has that id.
    NoSuchVm = 4,
    /// The destination's inbox or receive window is full; try again later.
    QueueFull = 5,
    /// The destination has exited.
    VmExited = 6,
    /// Unknown policy/transfer, zero or oversized length, misaligned remap.
    BadDescriptor = 7,
}

impl SendStatus {
    #[must_use]
    pub const fn from_raw(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Pending),
            1 => Some(Self::Delivered),
            2 => Some(Self::OutsideRam),
            3 => Some(Self::NotOwned),
            4 => Some(Self::NoSuchVm),
            5 => Some(Self::QueueFull),
            6 => Some(Self::VmExited),
            7 => Some(Self::BadDescriptor),
            _ => None,
        }
    }
}

/// An outbox entry: a message the guest sends.
///
/// Bytes: 0..4 destination id, 4 policy, 5 transfer, 6 huge (1 = 2 MiB pages),
/// 7 status, 8..12 length, 12 flags ([`Message::HOLD`]), 13..16 reserved,
/// 16..24 guest-physical address, 24..32 tag (opaque, handed to the receiver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub dest: u32,
    pub policy: u8,
    pub transfer: u8,
    pub huge: bool,
    pub status: u8,
    pub len: u32,
    pub flags: u8,
    pub addr: u64,
    pub tag: u64,
}

impl Message {
    /// When the destination is full, leave this message (and the rest of the
    /// outbox) for a later exit instead of refusing it with `QueueFull`:
    /// back-pressure that keeps a stream in order.
    pub const HOLD: u8 = 1;

    #[must_use]
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..4].copy_from_slice(&self.dest.to_le_bytes());
        b[4] = self.policy;
        b[5] = self.transfer;
        b[6] = u8::from(self.huge);
        b[7] = self.status;
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12] = self.flags;
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    /// Decodes raw bytes; any byte pattern decodes (validation is [`Self::check`]).
    #[must_use]
    pub fn decode(b: &[u8; ENTRY_SIZE]) -> Self {
        Self {
            dest: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            policy: b[4],
            transfer: b[5],
            huge: b[6] != 0,
            status: b[7],
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: b[12],
            addr: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            tag: u64::from_le_bytes([b[24], b[25], b[26], b[27], b[28], b[29], b[30], b[31]]),
        }
    }

    /// The page size a remap works at.
    #[must_use]
    pub const fn page_size(&self) -> u64 {
        if self.huge { HUGE_PAGE } else { PAGE }
    }

    /// Bytes of window a delivery takes: the length rounded up to the page size.
    #[must_use]
    pub const fn footprint(&self) -> u64 {
        let p = self.page_size();
        (self.len as u64).div_ceil(p) * p
    }

    /// Shape checks that need no knowledge of guests: known policy and transfer,
    /// length in 1..=[`MAX_MESSAGE`], the range does not wrap, a remap is aligned.
    pub fn check(&self) -> Result<(Policy, Transfer), SendStatus> {
        let policy = Policy::from_raw(self.policy).ok_or(SendStatus::BadDescriptor)?;
        let transfer = Transfer::from_raw(self.transfer).ok_or(SendStatus::BadDescriptor)?;
        if self.len == 0 || self.len > MAX_MESSAGE {
            return Err(SendStatus::BadDescriptor);
        }
        if self.addr.checked_add(self.footprint()).is_none() {
            return Err(SendStatus::OutsideRam);
        }
        if transfer == Transfer::Remap && !self.addr.is_multiple_of(self.page_size()) {
            return Err(SendStatus::BadDescriptor);
        }
        Ok((policy, transfer))
    }
}

/// An inbox entry: a message that arrived.
///
/// Bytes: 0..4 source id, 4 transfer, 5..8 reserved, 8..12 length, 12..16
/// reserved, 16..24 guest-physical address of the bytes (in the receive window),
/// 24..32 the sender's tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub source: u32,
    pub transfer: u8,
    pub len: u32,
    pub addr: u64,
    pub tag: u64,
}

impl Arrival {
    #[must_use]
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..4].copy_from_slice(&self.source.to_le_bytes());
        b[4] = self.transfer;
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    #[must_use]
    pub fn decode(b: &[u8; ENTRY_SIZE]) -> Self {
        Self {
            source: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            transfer: b[4],
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            addr: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            tag: u64::from_le_bytes([b[24], b[25], b[26], b[27], b[28], b[29], b[30], b[31]]),
        }
    }
}

/// The area's first bytes (shim-written, read-only by convention for the guest).
///
/// Bytes: 0..4 [`MAGIC`], 4..8 [`VERSION`], 8..12 this guest's id, 12..16 number of
/// directory records, 16..24 the window's guest-physical address, 24..32 its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub version: u32,
    pub my_id: u32,
    pub dir_len: u32,
    pub window: u64,
    pub window_size: u64,
}

pub const HEADER_SIZE: usize = 32;

impl Header {
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.my_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.dir_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.window.to_le_bytes());
        b[24..32].copy_from_slice(&self.window_size.to_le_bytes());
        b
    }

    #[must_use]
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Self {
            magic: u32_at(0),
            version: u32_at(4),
            my_id: u32_at(8),
            dir_len: u32_at(12),
            window: u64_at(16),
            window_size: u64_at(24),
        }
    }
}

/// A directory record: a guest's name and id.
///
/// Bytes: 0..4 id, 4..8 flags ([`DirRecord::ALIVE`]), 8..32 the name, NUL-padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirRecord {
    pub id: u32,
    pub flags: u32,
    pub name: [u8; NAME_LEN],
}

impl DirRecord {
    /// The guest is running (cleared when it exits).
    pub const ALIVE: u32 = 1;
    /// A direct channel joins the reader of the directory and this guest
    /// ([`crate::direct::channel`]).
    pub const DIRECT: u32 = 2;

    /// A record for `name`, truncated to [`NAME_LEN`] bytes.
    #[must_use]
    pub fn new(id: u32, name: &str, flags: u32) -> Self {
        let mut n = [0u8; NAME_LEN];
        let src = name.as_bytes();
        let k = src.len().min(NAME_LEN);
        n[..k].copy_from_slice(&src[..k]);
        Self { id, flags, name: n }
    }

    /// The name's bytes without the NUL padding.
    #[must_use]
    pub fn name_bytes(&self) -> &[u8] {
        let end = self.name.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
        &self.name[..end]
    }

    /// True when this record names `name` (compared as the directory stores it).
    #[must_use]
    pub fn is(&self, name: &str) -> bool {
        let src = name.as_bytes();
        self.name_bytes() == &src[..src.len().min(NAME_LEN)]
    }

    #[must_use]
    pub fn encode(&self) -> [u8; DIR_RECORD_SIZE] {
        let mut b = [0u8; DIR_RECORD_SIZE];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..32].copy_from_slice(&self.name);
        b
    }

    #[must_use]
    pub fn decode(b: &[u8; DIR_RECORD_SIZE]) -> Self {
        let mut name = [0u8; NAME_LEN];
        name.copy_from_slice(&b[8..32]);
        Self {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            flags: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn messages_round_trip(dest: u32, policy: u8, transfer: u8, huge: bool, status: u8,
                               len: u32, flags: u8, addr: u64, tag: u64) {
            let m = Message { dest, policy, transfer, huge, status, len, flags, addr, tag };
            prop_assert_eq!(Message::decode(&m.encode()), m);
        }

        #[test]
        fn any_bytes_decode_and_check_without_panicking(b in proptest::array::uniform32(any::<u8>())) {
            let m = Message::decode(&b);
            if let Ok((_, t)) = m.check() {
                prop_assert!(m.len >= 1 && m.len <= MAX_MESSAGE);
                prop_assert!(m.addr.checked_add(m.footprint()).is_some());
                if t == Transfer::Remap {
                    prop_assert_eq!(m.addr % m.page_size(), 0);
                }
            }
        }

        #[test]
        fn arrivals_round_trip(source: u32, transfer: u8, len: u32, addr: u64, tag: u64) {
            let a = Arrival { source, transfer, len, addr, tag };
            prop_assert_eq!(Arrival::decode(&a.encode()), a);
        }

        #[test]
        fn headers_round_trip(magic: u32, version: u32, my_id: u32, dir_len: u32,
                              window: u64, window_size: u64) {
            let h = Header { magic, version, my_id, dir_len, window, window_size };
            prop_assert_eq!(Header::decode(&h.encode()), h);
        }

        #[test]
        fn dir_records_round_trip(id: u32, flags: u32, name in "[a-z0-9-]{0,30}") {
            let r = DirRecord::new(id, &name, flags);
            let back = DirRecord::decode(&r.encode());
            prop_assert_eq!(back, r);
            prop_assert!(back.is(&name));
            prop_assert_eq!(back.name_bytes().len(), name.len().min(NAME_LEN));
        }

        #[test]
        fn occupancy_is_bounded(produced: u32, consumed: u32) {
            match occupancy(produced, consumed) {
                Some(n) => prop_assert!(n <= RING_ENTRIES),
                None => prop_assert!(produced.wrapping_sub(consumed) > RING_ENTRIES),
            }
        }
    }

    proptest! {
        #[test]
        fn kicks_round_trip(wait: bool, full: bool, done in 0..3u8, seen: u16, max_us in 0..=Kick::MAX_US) {
            let done = [UntilDone::No, UntilDone::Yes, UntilDone::IfHeld][usize::from(done)];
            let k = Kick { wait, full, done, seen, max_us };
            prop_assert_eq!(Kick::decode(k.encode()), k);
        }

        #[test]
        fn any_kick_value_decodes_in_range(v: u64) {
            prop_assert!(Kick::decode(v).max_us <= Kick::MAX_US);
        }
    }

    #[test]
    fn counters_wrap() {
        assert_eq!(occupancy(3, u32::MAX - 1), Some(5));
        assert_eq!(occupancy(0, 1), None);
        assert_eq!(entry_offset(RING_ENTRIES + 1), entry_offset(1));
    }

    #[test]
    fn hostile_shapes_are_refused() {
        let ok = Message {
            dest: 1,
            policy: 0,
            transfer: 1,
            huge: false,
            status: 0,
            len: 4096,
            flags: 0,
            addr: 0x20_0000,
            tag: 0,
        };
        assert_eq!(ok.check(), Ok((Policy::Immediate, Transfer::Remap)));
        let bad = |f: &dyn Fn(&mut Message)| {
            let mut m = ok;
            f(&mut m);
            m.check()
        };
        assert_eq!(bad(&|m| m.policy = 9), Err(SendStatus::BadDescriptor));
        assert_eq!(bad(&|m| m.transfer = 2), Err(SendStatus::BadDescriptor));
        assert_eq!(bad(&|m| m.len = 0), Err(SendStatus::BadDescriptor));
        assert_eq!(
            bad(&|m| m.len = MAX_MESSAGE + 1),
            Err(SendStatus::BadDescriptor)
        );
        assert_eq!(bad(&|m| m.addr = 0x20_0800), Err(SendStatus::BadDescriptor));
        assert_eq!(
            bad(&|m| m.addr = u64::MAX - 0xFFF),
            Err(SendStatus::OutsideRam)
        );
        assert_eq!(
            bad(&|m| {
                m.huge = true;
                m.addr = 0x1000;
            }),
            Err(SendStatus::BadDescriptor)
        );
        // A copy need not be aligned.
        assert!(
            bad(&|m| {
                m.transfer = 0;
                m.addr = 0x20_0801;
            })
            .is_ok()
        );
    }
}
