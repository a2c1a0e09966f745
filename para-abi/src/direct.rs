//! Direct channels: a ring pair two guests share, with no host thread and no
//! exit in the per-frame path.
//!
//! A channel joins two guests. Each owns one **endpoint**: memory it alone can
//! write, which the VMM also maps read-only into the peer (a read-only memslot,
//! so a peer's write there is refused by the VMM, never seen). An endpoint is
//! a control page ([`Ctrl`]) followed by [`SLOTS`] frame slots of [`SLOT_SIZE`]
//! bytes:
//!
//! | offset          | what                                                   |
//! |-----------------|--------------------------------------------------------|
//! | 0               | [`Ctrl`]: `produced`, `consumed`, `sleep` (own lines)   |
//! | [`SLOTS_AT`]    | slot *i*: length (u32) at +0, frame bytes at +[`SLOT_DATA_AT`] |
//!
//! A guest sees its channel to the guest with VM-queue id *p* at
//! [`channel`]`(p)`: its own endpoint, then the peer's, inside
//! [`crate::layout::area::DIRECT`]; the VM-queue directory flags the peers
//! that have one ([`crate::vmq::DirRecord::DIRECT`]).
//!
//! One direction of the pair, A → B, uses A's slots and `A.produced` (written
//! by A) and `B.consumed` (written by B): the sender owns its producer index
//! and its frames, the receiver owns its consumer index. Each side therefore
//! reads the other's words only, from its read-only view, and validates what
//! it reads: a hostile peer can spoil its own frames and stall its own
//! direction, nothing else.
//!
//! **Ordering.** The sender writes the slot, then publishes `produced` with
//! release; the receiver reads `produced` with acquire, copies the frame out,
//! then publishes `consumed` with release; the sender reads `consumed` with
//! acquire before it reuses a slot.
//!
//! **Sleeping.** A receiver that wants to halt instead of polling announces it
//! in its `sleep` word (a sequence number, odd while it sleeps), issues a
//! sequentially consistent fence and checks the ring once more; a sender
//! publishes `produced`, fences the same way and reads the peer's `sleep`.
//! With both fences at least one side sees the other's store (the store-load
//! pattern of Dekker's algorithm): either the receiver sees the frame and does
//! not sleep, or the sender sees the odd `sleep` and asks the host to wake the
//! receiver. The sender asks once per sleep (it remembers the sequence number
//! it woke), so a sleeping receiver costs its peer one wake-up request, not
//! one per frame.

#[cfg(not(loom))]
use core::sync::atomic::{AtomicU32, Ordering, fence};
#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, Ordering, fence};

/// The doorbell device number (M1 event records) of a wake-up request: queue
/// = the VM-queue id of the guest to wake.
pub const DOORBELL_DEVICE: u8 = 0xFC;

/// Layout version the VMM announces for direct channels.
pub const VERSION: u32 = 1;

/// Frame slots per endpoint (a power of two, so indices wrap cleanly).
pub const SLOTS: u32 = 256;
/// Bytes of one slot: its length word, padding, then the frame.
pub const SLOT_SIZE: usize = 2048;
/// Offset of the frame bytes inside a slot.
pub const SLOT_DATA_AT: usize = 16;
/// The largest frame a slot carries (an Ethernet frame of 1514 bytes fits).
pub const SLOT_DATA: usize = SLOT_SIZE - SLOT_DATA_AT;
/// Offset of slot 0 inside an endpoint: the control page comes first.
pub const SLOTS_AT: usize = 0x1000;
/// Bytes of one endpoint.
pub const ENDPOINT_SIZE: usize = SLOTS_AT + SLOTS as usize * SLOT_SIZE;

/// Bytes between the two endpoints of a channel in a guest's view.
pub const ENDPOINT_STRIDE: u64 = (ENDPOINT_SIZE as u64).next_multiple_of(0x1_0000);
/// Bytes of one channel in a guest's view: its own endpoint, then the peer's.
pub const CHANNEL_STRIDE: u64 = 2 * ENDPOINT_STRIDE;

/// Where a guest sees its channel to the guest with VM-queue id `peer`:
/// `(own endpoint, writable; the peer's endpoint, read-only)`, or `None` for
/// an id beyond the directory.
#[must_use]
pub const fn channel(peer: u32) -> Option<(u64, u64)> {
    if peer as usize >= crate::vmq::DIR_ENTRIES {
        return None;
    }
    let own = crate::layout::area::DIRECT + peer as u64 * CHANNEL_STRIDE;
    Some((own, own + ENDPOINT_STRIDE))
}

const _: () =
    assert!(CHANNEL_STRIDE * crate::vmq::DIR_ENTRIES as u64 <= crate::layout::area::DIRECT_SIZE);
const _: () = assert!(SLOTS.is_power_of_two());
const _: () = assert!(ENDPOINT_SIZE.is_multiple_of(0x1000));
const _: () = assert!(SLOT_DATA >= 1514);

/// One 32-bit word on a cache line of its own, so the two guests' hot words
/// never share a line.
#[repr(C, align(64))]
pub struct Line(pub AtomicU32);

/// The control page of an endpoint; only its owner writes it.
#[repr(C)]
pub struct Ctrl {
    /// Frames the owner has published in its slots (free-running, wrapping).
    pub produced: Line,
    /// Frames the owner has consumed from the peer's slots (free-running).
    pub consumed: Line,
    /// Odd while the owner sleeps and wants a wake-up when the peer posts;
    /// incremented on every change, so each sleep has its own number.
    pub sleep: Line,
}

#[cfg(not(loom))]
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(Ctrl, produced) == 0);
    assert!(offset_of!(Ctrl, consumed) == 64);
    assert!(offset_of!(Ctrl, sleep) == 128);
    assert!(size_of::<Ctrl>() <= SLOTS_AT);
};

impl Ctrl {
    /// A fresh control page: nothing produced or consumed, awake.
    #[must_use]
    pub fn new() -> Self {
        Self {
            produced: Line(AtomicU32::new(0)),
            consumed: Line(AtomicU32::new(0)),
            sleep: Line(AtomicU32::new(0)),
        }
    }
}

impl Default for Ctrl {
    fn default() -> Self {
        Self::new()
    }
}

/// Byte offset of slot `index` (a free-running counter) inside an endpoint.
#[must_use]
pub const fn slot_offset(index: u32) -> usize {
    SLOTS_AT + (index % SLOTS) as usize * SLOT_SIZE
}

/// Frames in flight given a producer and a consumer index, or `None` when the
/// pair is impossible (the consumer ahead, or more than [`SLOTS`] apart): one
/// of the two words was written by a peer that does not follow the protocol.
#[must_use]
pub const fn in_flight(produced: u32, consumed: u32) -> Option<u32> {
    let n = produced.wrapping_sub(consumed);
    if n > SLOTS { None } else { Some(n) }
}

/// Where frame bytes live: an endpoint's slots. The guest and the host's tests
/// implement it over mapped memory; the loom model over atomics.
pub trait Slots {
    /// Writes `frame` (at most [`SLOT_DATA`] bytes) and its length into slot `index`.
    fn put(&self, index: u32, frame: &[u8]);
    /// The length word of slot `index`, as the slot's owner wrote it.
    fn len(&self, index: u32) -> u32;
    /// Copies `out.len()` bytes (at most [`SLOT_DATA`]) of slot `index` into `out`.
    fn get(&self, index: u32, out: &mut [u8]);
}

/// An endpoint's slots in mapped memory: the guest's view of its own
/// (writable) or its peer's (read-only) endpoint.
#[cfg(not(loom))]
#[derive(Clone, Copy)]
pub struct RawSlots {
    base: *mut u8,
}

#[cfg(not(loom))]
impl RawSlots {
    /// Slots of the endpoint at `endpoint`.
    ///
    /// # Safety
    /// `endpoint` points to [`ENDPOINT_SIZE`] bytes, aligned to 4 KiB, that
    /// stay mapped while the value lives; writable if [`Slots::put`] is used.
    /// The peer may change the bytes at any time: they are only ever copied,
    /// never referenced.
    #[must_use]
    pub const unsafe fn new(endpoint: *mut u8) -> Self {
        Self { base: endpoint }
    }

    fn slot(self, index: u32) -> *mut u8 {
        self.base.wrapping_add(slot_offset(index))
    }

    /// Runs `f` on slot `index`'s length word.
    fn with_len<R>(self, index: u32, f: impl FnOnce(&AtomicU32) -> R) -> R {
        // Slots are 2 KiB-aligned inside a 4 KiB-aligned endpoint, so the
        // length word is 4-byte aligned.
        #[allow(clippy::cast_ptr_alignment)]
        let word = self.slot(index).cast::<u32>();
        // SAFETY: `new`'s contract keeps the slot mapped for this call; the
        // word is aligned (above) and only ever accessed atomically, by
        // either side.
        f(unsafe { AtomicU32::from_ptr(word) })
    }
}

#[cfg(not(loom))]
impl Slots for RawSlots {
    fn put(&self, index: u32, frame: &[u8]) {
        let n = frame.len().min(SLOT_DATA);
        // SAFETY: `new`'s contract: the slot's SLOT_DATA bytes at SLOT_DATA_AT
        // are mapped and writable; `n` stays inside them.
        unsafe {
            core::ptr::copy_nonoverlapping(frame.as_ptr(), self.slot(index).add(SLOT_DATA_AT), n);
        }
        self.with_len(index, |w| w.store(n as u32, Ordering::Relaxed));
    }

    fn len(&self, index: u32) -> u32 {
        self.with_len(index, |w| w.load(Ordering::Relaxed))
    }

    fn get(&self, index: u32, out: &mut [u8]) {
        let n = out.len().min(SLOT_DATA);
        // SAFETY: `new`'s contract: the slot's data bytes are mapped; `n`
        // stays inside them and inside `out`.
        unsafe {
            core::ptr::copy_nonoverlapping(self.slot(index).add(SLOT_DATA_AT), out.as_mut_ptr(), n);
        }
    }
}

/// Why a frame was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// Every slot holds a frame the peer has not consumed yet.
    Full,
    /// The frame is empty or longer than [`SLOT_DATA`].
    BadLength(usize),
    /// The peer's consumer index is impossible; nothing is sent until it is sane.
    PeerCorrupt,
}

/// A sent frame, and whether the peer must be woken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The peer announced a sleep this sender has not yet asked the host to
    /// end: ask now (an M1 doorbell event naming the peer).
    pub wake_peer: bool,
}

/// The sending half of one endpoint: my slots and `produced`, the peer's
/// `consumed` and `sleep` (read-only).
pub struct Sender<'a, S: Slots> {
    mine: &'a Ctrl,
    peer: &'a Ctrl,
    slots: S,
    /// The peer's `sleep` number this sender last asked to wake.
    woken: u32,
}

impl<'a, S: Slots> Sender<'a, S> {
    /// A sender over my control page, the peer's (read-only) and my slots.
    pub fn new(mine: &'a Ctrl, peer: &'a Ctrl, slots: S) -> Self {
        Self {
            mine,
            peer,
            slots,
            woken: 0,
        }
    }

    /// Free slots now, or [`SendError::PeerCorrupt`].
    pub fn space(&self) -> Result<u32, SendError> {
        let produced = self.mine.produced.0.load(Ordering::Relaxed);
        // Acquire: the peer's copies out of the slots it released happen
        // before this sender overwrites them.
        let consumed = self.peer.consumed.0.load(Ordering::Acquire);
        in_flight(produced, consumed)
            .map(|n| SLOTS - n)
            .ok_or(SendError::PeerCorrupt)
    }

    /// Publishes one frame.
    pub fn send(&mut self, frame: &[u8]) -> Result<Sent, SendError> {
        if frame.is_empty() || frame.len() > SLOT_DATA {
            return Err(SendError::BadLength(frame.len()));
        }
        if self.space()? == 0 {
            return Err(SendError::Full);
        }
        let produced = self.mine.produced.0.load(Ordering::Relaxed);
        self.slots.put(produced, frame);
        self.mine
            .produced
            .0
            .store(produced.wrapping_add(1), Ordering::Release);
        Ok(Sent {
            wake_peer: self.peer_sleeps_unwoken(),
        })
    }

    /// True once per peer sleep: the peer's `sleep` is odd and this sender has
    /// not asked to wake that sleep yet. Call after publishing.
    fn peer_sleeps_unwoken(&mut self) -> bool {
        // Store (produced) then load (sleep): the fence pairs with the
        // receiver's in `Receiver::prepare_sleep`.
        fence(Ordering::SeqCst);
        let sleep = self.peer.sleep.0.load(Ordering::Relaxed);
        if sleep % 2 == 1 && sleep != self.woken {
            self.woken = sleep;
            true
        } else {
            false
        }
    }
}

/// Why a received frame was dropped (each also counts in [`RecvStats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvError {
    /// The peer's length word was 0 or above [`SLOT_DATA`]; the frame is skipped.
    BadLength(u32),
    /// The frame is longer than the caller's buffer; the frame is skipped.
    TooLong(u32),
    /// The peer's producer index is impossible; everything it claims to have
    /// sent is skipped and the receiver resumes from its current index.
    PeerCorrupt,
}

/// What a receiver dropped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvStats {
    pub bad_length: u64,
    pub too_long: u64,
    pub corrupt: u64,
}

/// The receiving half of one endpoint: my `consumed` and `sleep`, the peer's
/// `produced` and slots (read-only).
pub struct Receiver<'a, S: Slots> {
    mine: &'a Ctrl,
    peer: &'a Ctrl,
    slots: S,
    stats: RecvStats,
}

impl<'a, S: Slots> Receiver<'a, S> {
    /// A receiver over my control page, the peer's (read-only) and the peer's slots.
    pub fn new(mine: &'a Ctrl, peer: &'a Ctrl, slots: S) -> Self {
        Self {
            mine,
            peer,
            slots,
            stats: RecvStats::default(),
        }
    }

    /// What this receiver dropped so far.
    #[must_use]
    pub fn stats(&self) -> RecvStats {
        self.stats
    }

    /// True when the peer's producer index differs from mine: a frame is
    /// waiting, or the index is impossible and [`Self::recv`] will say so.
    /// A plain read, for wait loops.
    #[must_use]
    pub fn waiting(&self) -> bool {
        self.peer.produced.0.load(Ordering::Acquire) != self.mine.consumed.0.load(Ordering::Relaxed)
    }

    /// Frames waiting, validated. An impossible producer index is repaired
    /// here (skipped over, counted) and reads as [`RecvError::PeerCorrupt`].
    pub fn pending(&mut self) -> Result<u32, RecvError> {
        let consumed = self.mine.consumed.0.load(Ordering::Relaxed);
        let produced = self.peer.produced.0.load(Ordering::Acquire);
        if let Some(n) = in_flight(produced, consumed) {
            Ok(n)
        } else {
            self.stats.corrupt += 1;
            self.mine.consumed.0.store(produced, Ordering::Release);
            Err(RecvError::PeerCorrupt)
        }
    }

    /// Copies the next frame into `out`: `Ok(Some(len))`, `Ok(None)` when
    /// none is waiting, or the reason the next frame was dropped (the ring
    /// moves past it either way).
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<usize>, RecvError> {
        if self.pending()? == 0 {
            return Ok(None);
        }
        let consumed = self.mine.consumed.0.load(Ordering::Relaxed);
        // The length is read once; the copy uses that value, so a peer that
        // rewrites it meanwhile can only garble its own frame.
        let len = self.slots.len(consumed);
        let result = if len == 0 || len as usize > SLOT_DATA {
            self.stats.bad_length += 1;
            Err(RecvError::BadLength(len))
        } else if len as usize > out.len() {
            self.stats.too_long += 1;
            Err(RecvError::TooLong(len))
        } else {
            self.slots.get(consumed, &mut out[..len as usize]);
            Ok(Some(len as usize))
        };
        // Release: the copy above happens before the peer may reuse the slot.
        self.mine
            .consumed
            .0
            .store(consumed.wrapping_add(1), Ordering::Release);
        result
    }

    /// Announces a sleep: returns `true` when the ring is still empty after
    /// the announcement (sleep now; the peer will ask the host to wake me), or
    /// `false` when frames are waiting (the announcement is withdrawn).
    pub fn prepare_sleep(&mut self) -> bool {
        let sleep = self.mine.sleep.0.load(Ordering::Relaxed);
        let odd = if sleep.is_multiple_of(2) {
            sleep.wrapping_add(1)
        } else {
            sleep
        };
        self.mine.sleep.0.store(odd, Ordering::Relaxed);
        // Store (sleep) then load (produced): pairs with the sender's fence.
        fence(Ordering::SeqCst);
        if matches!(self.pending(), Ok(0)) {
            true
        } else {
            self.wake();
            false
        }
    }

    /// Ends a sleep (after waking, or when it was withdrawn).
    pub fn wake(&mut self) {
        let sleep = self.mine.sleep.0.load(Ordering::Relaxed);
        if sleep % 2 == 1 {
            self.mine
                .sleep
                .0
                .store(sleep.wrapping_add(1), Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
