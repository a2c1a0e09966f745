//! A hostile peer on a direct channel, for the `shim-direct` leg
//! (`udp-pingpong` with `pingpong.hostile=1`): before it opens its NIC, the
//! guest spoils its own endpoint of the channel to `peer` — frames with
//! impossible lengths, then an impossible producer index — waits until the
//! peer has moved past them, and stores into the peer's endpoint, which the
//! shim maps read-only for it. A correct peer drops and counts the garbage
//! and keeps running; the shim refuses and counts the stores; the ping-pong
//! that follows must still get every ping back.

use core::sync::atomic::Ordering;
use core::time::Duration;

use guest_kernel::rt::time::Instant;
use guest_kernel::rt::vmq;
use para_abi::direct::{self, Ctrl, RawSlots, SLOTS, Slots};

/// What the attack did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Attack {
    /// Frames with impossible lengths published.
    pub bad_frames: u32,
    /// Impossible producer indices published.
    pub bad_indices: u32,
    /// Stores into the peer's (read-only) endpoint tried.
    pub stores: u32,
    /// The peer's words after those stores: unchanged means refused.
    pub peer_unchanged: bool,
}

fn ctrl(gpa: u64) -> &'static Ctrl {
    // SAFETY: `gpa` is an endpoint of the direct area, mapped for ring 3 by
    // the boot page tables and kept by the shim for the VM's life; its
    // control words are 64-byte aligned atomics.
    unsafe { &*(gpa as *const Ctrl) }
}

/// Overwrites the length word of slot `index` of this guest's endpoint at `own`.
fn set_len(own: u64, index: u32, len: u32) {
    let word = (own as usize + direct::slot_offset(index)) as *mut u32;
    // SAFETY: inside this guest's own endpoint (writable, mapped for the VM's
    // life); the length word is 4-byte aligned and accessed atomically by
    // both guests.
    unsafe { core::sync::atomic::AtomicU32::from_ptr(word) }.store(len, Ordering::Release);
}

/// Waits until the peer has consumed up to `index`, at most `limit`.
fn wait_consumed(peer: &Ctrl, index: u32, limit: Duration) -> bool {
    let end = Instant::now().checked_add(limit);
    while peer.consumed.0.load(Ordering::Acquire) != index {
        if end.is_some_and(|e| Instant::now() >= e) {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Spoils the channel to the guest called `peer` (see the module docs).
pub fn spoil_direct_channel(peer: &str) -> Result<Attack, &'static str> {
    let q = vmq::open().map_err(|_| "no VM-queue area")?;
    let id = q.lookup(peer).ok_or("no such peer in the directory")?;
    let (own, theirs) = direct::channel(id).ok_or("peer id beyond the directory")?;
    let (mine, peer) = (ctrl(own), ctrl(theirs));
    // SAFETY: this guest's own endpoint, writable and mapped as `ctrl` says.
    let slots = unsafe { RawSlots::new(own as *mut u8) };
    let mut a = Attack::default();
    let limit = Duration::from_secs(10);

    // Frames whose length words are impossible: the bytes say 4, the word
    // says 0, more than a slot, or everything.
    let start = mine.produced.0.load(Ordering::Relaxed);
    for (k, len) in [0u32, direct::SLOT_DATA as u32 + 1, u32::MAX]
        .into_iter()
        .enumerate()
    {
        let index = start.wrapping_add(k as u32);
        slots.put(index, b"junk");
        set_len(own, index, len);
        a.bad_frames += 1;
    }
    let after = start.wrapping_add(a.bad_frames);
    mine.produced.0.store(after, Ordering::Release);
    if !wait_consumed(peer, after, limit) {
        return Err("the peer never moved past the bad frames");
    }

    // A producer index further ahead than the ring holds.
    let jump = after.wrapping_add(SLOTS + 5);
    mine.produced.0.store(jump, Ordering::Release);
    a.bad_indices += 1;
    if !wait_consumed(peer, jump, limit) {
        return Err("the peer never resynchronised after the impossible index");
    }

    // Stores into the peer's endpoint: each one exits and is refused.
    let before = (
        peer.produced.0.load(Ordering::Relaxed),
        peer.consumed.0.load(Ordering::Relaxed),
    );
    for v in [0xDEAD_BEEF, 0, 7] {
        peer.consumed.0.store(v, Ordering::Relaxed);
        a.stores += 1;
    }
    // The peer's consumed index may only have moved by its own doing: it is
    // idle now, so both words must read as before.
    let now = (
        peer.produced.0.load(Ordering::Relaxed),
        peer.consumed.0.load(Ordering::Relaxed),
    );
    a.peer_unchanged = now == before;
    Ok(a)
}
