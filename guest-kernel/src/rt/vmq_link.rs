//! The guest's end of an Ethernet link over VM queues: implements
//! `drivers::vmq_net::FrameLink` on [`super::vmq`] for one peer guest, found
//! by name in the shim's directory.
//!
//! One message is one frame, copied by the shim (`Transfer::Copy`) from one
//! of [`SLOTS`] send buffers; buffer `i % SLOTS` belongs to outbox index `i`,
//! free again once the shim has acted on that index — which posting index
//! `i + SLOTS` already requires, so a buffer is never rewritten before the
//! shim has read it. Messages carry no `HOLD`: a full peer drops the frame
//! (`QueueFull`, counted here), as a full NIC ring would; TCP/ARP retry.
//!
//! Delivery ([`LinkPolicy`]): by default frames are posted lazily and leave
//! with the stack's next exit: its wait is one kick-page exit the shim sees
//! ([`VmqLink::idle`]) rather than a halt, so a lazy link makes no flush of
//! its own unless its outbox fills up; `immediate` flushes per frame;
//! `doorbell` rings an M1 event per frame (no exit where the shim's monitor
//! is spinning).
//!
//! The link assumes it is the guest's only VM-queue user: it takes every
//! arrival as a frame (whoever sent it; smoltcp filters by address) and
//! tallies every outbox status as a frame's.

use super::vmq::{self, Policy, Transfer, Vmq, VmqError};
use alloc::alloc::{Layout, alloc_zeroed};
use core::fmt;
use drivers::vmq_net::{FrameLink, LinkError, MAX_FRAME_LEN};
use para_abi::vmq::{Message, RING_ENTRIES, SendStatus};

/// Send buffers: one per outbox entry.
pub const SLOTS: usize = RING_ENTRIES as usize;
/// Each buffer is 2 KiB aligned so a frame never spans two pages.
const SLOT_SIZE: usize = 2048;
const _: () = assert!(MAX_FRAME_LEN <= SLOT_SIZE);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPolicy {
    /// Post; flush at [`FrameLink::flush`] (the stack's end of poll / wait).
    Lazy,
    /// A flush hypercall per frame.
    Immediate,
    /// An M1 doorbell event per frame (a flush where there are no doorbells).
    Doorbell,
}

impl LinkPolicy {
    /// `net.vmq_policy=` word.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lazy" => Some(Self::Lazy),
            "immediate" => Some(Self::Immediate),
            "doorbell" => Some(Self::Doorbell),
            _ => None,
        }
    }

    const fn queue_policy(self) -> Policy {
        match self {
            Self::Lazy => Policy::Lazy,
            Self::Immediate => Policy::Immediate,
            Self::Doorbell => Policy::Doorbell,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkOpenError {
    Vmq(VmqError),
    /// No guest of that name in the directory (or it is this guest).
    NoPeer,
    OutOfMemory,
}

impl fmt::Display for LinkOpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vmq(e) => write!(f, "{e}"),
            Self::NoPeer => write!(
                f,
                "net.vmq_peer= names no other guest in the VM-queue directory"
            ),
            Self::OutOfMemory => write!(f, "out of heap for VM-queue send buffers"),
        }
    }
}

/// What became of sent frames, from the shim's status bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub delivered: u64,
    /// Refused by a full peer inbox or window (dropped).
    pub queue_full: u64,
    /// Any other refusal (peer gone, bad descriptor...).
    pub refused: u64,
}

pub struct VmqLink {
    q: &'static Vmq,
    peer: u32,
    policy: LinkPolicy,
    /// `SLOTS` buffers of `SLOT_SIZE` bytes; guest-physical = virtual here.
    bufs: *mut u8,
    /// Outbox statuses before this index are in `stats`.
    tallied: u32,
    stats: LinkStats,
}

impl fmt::Debug for VmqLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmqLink")
            .field("peer", &self.peer)
            .field("policy", &self.policy)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl VmqLink {
    /// Opens this guest's VM-queue area and a link to the guest called `peer`.
    pub fn open(peer: &str, policy: LinkPolicy) -> Result<Self, LinkOpenError> {
        let q = vmq::open().map_err(LinkOpenError::Vmq)?;
        let peer = q
            .lookup(peer)
            .filter(|&id| id != q.id())
            .ok_or(LinkOpenError::NoPeer)?;
        let layout = Layout::from_size_align(SLOTS * SLOT_SIZE, SLOT_SIZE)
            .map_err(|_| LinkOpenError::OutOfMemory)?;
        // SAFETY: non-zero size; the buffers live as long as the link, which
        // the network stack keeps for the guest's life (never freed: a
        // lazily posted frame may still be read by the shim at any exit).
        let bufs = unsafe { alloc_zeroed(layout) };
        if bufs.is_null() {
            return Err(LinkOpenError::OutOfMemory);
        }
        Ok(Self {
            q,
            peer,
            policy,
            bufs,
            tallied: q.posted(),
            stats: LinkStats::default(),
        })
    }

    #[must_use]
    pub fn peer(&self) -> u32 {
        self.peer
    }

    #[must_use]
    pub fn my_id(&self) -> u32 {
        self.q.id()
    }

    #[must_use]
    pub fn policy(&self) -> LinkPolicy {
        self.policy
    }

    /// Flush hypercalls made by this guest's VM-queue API (exits).
    #[must_use]
    pub fn flushes(&self) -> u64 {
        self.q.flushes.load(core::sync::atomic::Ordering::Relaxed)
    }

    /// Outcomes of the frames the shim has acted on so far.
    pub fn stats(&mut self) -> LinkStats {
        self.tally();
        self.stats
    }

    /// Counts the statuses the shim has written since last time; each is read
    /// before its outbox entry can be posted again.
    fn tally(&mut self) {
        let done = self.q.done();
        while self.tallied != done {
            match self.q.status(self.tallied) {
                SendStatus::Delivered => self.stats.delivered += 1,
                SendStatus::QueueFull => self.stats.queue_full += 1,
                _ => self.stats.refused += 1,
            }
            self.tallied = self.tallied.wrapping_add(1);
        }
    }

    /// Waits by one kick-page exit (delivering lazily posted frames) until
    /// a frame arrives or `max_us` passes (0: the shim's longest wait).
    pub fn idle(&self, max_us: u32) {
        if self.q.is_empty() {
            self.q.wait_for(0, false, max_us);
        }
    }

    fn outbox_full(&self) -> bool {
        self.q.posted().wrapping_sub(self.q.done()) >= RING_ENTRIES
    }
}

impl FrameLink for VmqLink {
    fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        if frame.is_empty() || frame.len() > SLOT_SIZE {
            return Err(LinkError::Refused);
        }
        if self.outbox_full() {
            // Without HOLD every drain answers every entry: one flush empties it.
            self.q.flush_full();
            if self.outbox_full() {
                return Err(LinkError::Full);
            }
        }
        self.tally();
        let index = self.q.posted();
        let slot = index as usize % SLOTS;
        // SAFETY: slot `slot` is inside the allocation; its previous message
        // (index - SLOTS) has been acted on, since fewer than SLOTS are
        // outstanding, so the shim no longer reads it.
        let buf = unsafe { self.bufs.add(slot * SLOT_SIZE) };
        // SAFETY: `frame.len() <= SLOT_SIZE` (checked) and the regions are disjoint.
        unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), buf, frame.len()) };
        let m = Message {
            dest: self.peer,
            policy: self.policy.queue_policy() as u8,
            transfer: Transfer::Copy as u8,
            huge: false,
            status: 0,
            len: frame.len() as u32,
            flags: 0,
            addr: buf as u64,
            tag: u64::from(index),
        };
        // The release store of `produced` in `post` orders the copy before it.
        self.q.post(&m).ok_or(LinkError::Full)?;
        match self.policy {
            LinkPolicy::Lazy => {}
            LinkPolicy::Immediate => self.q.flush(),
            LinkPolicy::Doorbell => self.q.ring(),
        }
        Ok(())
    }

    fn recv<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let a = self.q.peek()?;
        // An arrival the shim placed outside the window is handed on as an
        // empty frame, which the device drops and counts as a runt.
        let r = take(self.q.bytes(&a).unwrap_or(&[]));
        self.q.consume();
        Some(r)
    }

    fn rx_pending(&self) -> bool {
        !self.q.is_empty()
    }

    fn can_send(&self) -> bool {
        // A lazy link whose outbox is full makes room with a flush in `send`.
        true
    }

    fn flush(&mut self) {
        if self.policy == LinkPolicy::Lazy && self.q.posted() != self.q.done() {
            self.q.flush();
        }
    }
}
