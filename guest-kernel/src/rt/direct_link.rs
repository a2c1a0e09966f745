//! The guest's end of a direct channel to one peer (`para_abi::direct`): a
//! ring pair the shim maps between two guests at start-up, with no host
//! thread and no exit per frame. Implements `drivers::vmq_net::FrameLink`, so
//! the VM-queue NIC (`net.dev=vmq net.vmq_policy=direct`) runs the unchanged
//! network stack over it.
//!
//! The peer is found by name in the VM-queue directory, which flags the
//! peers this guest has a channel with. Each frame is copied into a slot of
//! this guest's endpoint and published; the receiver validates the length
//! and copies it out. A receiver that halts announces it first
//! ([`DirectLink::prepare_sleep`]); a sender that sees the announcement asks
//! the host once, by a doorbell event, to wake it with an upcall.

use super::doorbell;
use super::vmq::{self, VmqError};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use drivers::vmq_net::{FrameLink, LinkError};
use para_abi::direct::{self, Ctrl, RawSlots, Receiver, RecvStats, SendError, Sender};
use para_abi::discovery::{self, features};
use para_abi::doorbell::{Event, Op};
use para_abi::layout::area;
use para_abi::vmq::DirRecord;

/// Why a direct link could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectOpenError {
    /// No VM-queue area (not under the shim, or `--vmq off`).
    Vmq(VmqError),
    /// The shim offers no direct channels, or at another address or version.
    Unavailable(&'static str),
    /// No guest of that name in the directory (or it is this guest).
    NoPeer,
    /// The peer exists but the shim made no channel between us.
    NoChannel,
}

impl fmt::Display for DirectOpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vmq(e) => write!(f, "{e}"),
            Self::Unavailable(why) => write!(f, "no direct channels: {why}"),
            Self::NoPeer => f.write_str("no other guest of that name in the directory"),
            Self::NoChannel => f.write_str("the shim made no direct channel to that guest"),
        }
    }
}

/// What the link did besides carrying frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectStats {
    /// Frames refused because the peer had every slot full.
    pub full: u64,
    /// Sends refused because the peer's consumer index was impossible.
    pub peer_corrupt: u64,
    /// Wake-up requests sent to the host for a sleeping peer.
    pub wakes_sent: u64,
    /// Frames of the peer dropped by reason (bad length, corrupt index).
    pub rx: RecvStats,
}

/// One guest's end of a direct channel.
pub struct DirectLink {
    me: u32,
    peer: u32,
    tx: Sender<'static, RawSlots>,
    rx: Receiver<'static, RawSlots>,
    /// Frames are copied out of the peer's slot before anyone looks at them.
    buf: Vec<u8>,
    full: u64,
    peer_corrupt: u64,
    wakes_sent: u64,
}

impl fmt::Debug for DirectLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectLink")
            .field("me", &self.me)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Checks the shim's offer: the feature bit and the leaf naming the fixed area.
fn offered() -> Result<(), DirectOpenError> {
    let f = core::arch::x86_64::__cpuid_count(discovery::LEAF_FEATURES, 0);
    if f.eax & features::DIRECT_CHANNELS == 0 {
        return Err(DirectOpenError::Unavailable("the shim does not offer them"));
    }
    let l = core::arch::x86_64::__cpuid_count(discovery::LEAF_DIRECT, 0);
    match discovery::area_from_registers([l.eax, l.ebx, l.ecx, l.edx]) {
        // Only the fixed area is mapped for ring 3 by the boot page tables.
        Some((gpa, size, version))
            if gpa == area::DIRECT
                && u64::from(size) >= area::DIRECT_SIZE
                && version == direct::VERSION =>
        {
            Ok(())
        }
        _ => Err(DirectOpenError::Unavailable("address, size or version")),
    }
}

/// The control page at the start of the endpoint at `gpa`.
fn ctrl(gpa: u64) -> &'static Ctrl {
    // SAFETY: `gpa` is an endpoint inside the fixed direct area, which the
    // boot page tables map for ring 3 and the shim keeps mapped for the VM's
    // life (the peer's read-only); its first page holds the 64-byte-aligned
    // control words, only ever accessed atomically.
    unsafe { &*(gpa as *const Ctrl) }
}

fn slots(gpa: u64) -> RawSlots {
    // SAFETY: as `ctrl`: ENDPOINT_SIZE bytes, 4 KiB-aligned, mapped for the
    // VM's life; only this guest's own endpoint is ever written.
    unsafe { RawSlots::new(gpa as *mut u8) }
}

impl DirectLink {
    /// Opens the channel to the guest called `peer`.
    pub fn open(peer: &str) -> Result<Self, DirectOpenError> {
        let q = vmq::open().map_err(DirectOpenError::Vmq)?;
        offered()?;
        let id = q
            .lookup(peer)
            .filter(|&id| id != q.id())
            .ok_or(DirectOpenError::NoPeer)?;
        let record = q.record(id).ok_or(DirectOpenError::NoPeer)?;
        if record.flags & DirRecord::DIRECT == 0 {
            return Err(DirectOpenError::NoChannel);
        }
        let (own, theirs) = direct::channel(id).ok_or(DirectOpenError::NoPeer)?;
        Ok(Self {
            me: q.id(),
            peer: id,
            tx: Sender::new(ctrl(own), ctrl(theirs), slots(own)),
            rx: Receiver::new(ctrl(own), ctrl(theirs), slots(theirs)),
            buf: vec![0u8; direct::SLOT_DATA],
            full: 0,
            peer_corrupt: 0,
            wakes_sent: 0,
        })
    }

    #[must_use]
    pub fn peer(&self) -> u32 {
        self.peer
    }

    #[must_use]
    pub fn my_id(&self) -> u32 {
        self.me
    }

    #[must_use]
    pub fn stats(&self) -> DirectStats {
        DirectStats {
            full: self.full,
            peer_corrupt: self.peer_corrupt,
            wakes_sent: self.wakes_sent,
            rx: self.rx.stats(),
        }
    }

    /// Announces that this guest is about to halt: `true` when it may (the
    /// peer will have it woken), `false` when frames arrived meanwhile.
    pub fn prepare_sleep(&mut self) -> bool {
        self.rx.prepare_sleep()
    }

    /// Ends the sleep announced by [`Self::prepare_sleep`].
    pub fn wake(&mut self) {
        self.rx.wake();
    }

    /// Asks the host to wake the peer: a doorbell event where the shim
    /// offers doorbells (no exit while its monitor spins).
    fn wake_peer(&mut self) {
        if let Ok(d) = doorbell::get() {
            let _ = d.send(Event {
                device: direct::DOORBELL_DEVICE,
                queue: self.peer as u16,
                op: Op::Notify,
                arg: 0,
            });
            self.wakes_sent += 1;
        }
    }
}

impl FrameLink for DirectLink {
    fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        match self.tx.send(frame) {
            Ok(sent) => {
                if sent.wake_peer {
                    self.wake_peer();
                }
                Ok(())
            }
            Err(SendError::Full) => {
                self.full += 1;
                Err(LinkError::Full)
            }
            Err(SendError::PeerCorrupt) => {
                self.peer_corrupt += 1;
                Err(LinkError::Refused)
            }
            Err(SendError::BadLength(_)) => Err(LinkError::Refused),
        }
    }

    fn recv<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<R> {
        loop {
            match self.rx.recv(&mut self.buf) {
                Ok(Some(n)) => return Some(take(&self.buf[..n])),
                Ok(None) => return None,
                // Dropped and counted by the receiver; the ring moved on.
                Err(_) => {}
            }
        }
    }

    fn rx_pending(&self) -> bool {
        self.rx.waiting()
    }

    fn can_send(&self) -> bool {
        self.tx.space().is_ok_and(|n| n > 0)
    }
}
