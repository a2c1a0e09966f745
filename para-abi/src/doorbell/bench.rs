//! The notification benchmark's contract (`cargo xtask bench notify`): one
//! guest notifies the host through four paths and the host timestamps each
//! observation against the guest's send time.
//!
//! The guest owns a page-aligned mailbox page in its RAM and names it with the
//! `NotifyBench` hypercall. Per notification the guest stores the path tag, a
//! new sequence number and its TSC just before notifying; the host observer
//! reads them, reads its own TSC, converts with KVM's TSC offset (guest TSC =
//! host TSC + offset, measured at the hypercall) and stores the sequence number
//! into [`ACK`]; the guest waits for that before the next notification, so one
//! notification is in flight at a time. At the end of each path the guest
//! writes its own cost (TSC cycles summed over the notify instruction(s)) and
//! count into the mailbox, which the host reports.

use super::super::layout::{KICK_BASE, KICK_SPAN};

/// A 4-byte write here exits to the shim's user space (path [`path::MMIO_EXIT`]).
pub const EXIT_GPA: u64 = KICK_BASE + KICK_SPAN - 0x1000;
/// A 4-byte write here is an ioeventfd that KVM signals itself
/// (path [`path::IOEVENTFD`]).
pub const IOEVENTFD_GPA: u64 = KICK_BASE + KICK_SPAN - 0x800;

/// Path tags (the mailbox's [`PATH`] word).
pub mod path {
    /// Not measured (warm-up): acknowledged, no sample kept.
    pub const WARMUP: u64 = 0;
    /// (a) an MMIO write that exits to the VMM's user space.
    pub const MMIO_EXIT: u64 = 1;
    /// (b) an MMIO write bound to an ioeventfd.
    pub const IOEVENTFD: u64 = 2;
    /// (c) a doorbell event, the monitor spinning.
    pub const DOORBELL_SPIN: u64 = 3;
    /// (d) a doorbell event, the monitor parked (the trapping kick wakes it).
    pub const DOORBELL_PARKED: u64 = 4;
    /// The measured paths.
    pub const ALL: [u64; 4] = [MMIO_EXIT, IOEVENTFD, DOORBELL_SPIN, DOORBELL_PARKED];
    /// Stable names (the stats JSON keys).
    #[must_use]
    pub const fn name(p: u64) -> &'static str {
        match p {
            MMIO_EXIT => "mmio_exit",
            IOEVENTFD => "ioeventfd",
            DOORBELL_SPIN => "doorbell_spin",
            DOORBELL_PARKED => "doorbell_parked",
            _ => "warmup",
        }
    }
}

/// Mailbox word indices (each an 8-byte little-endian word).
/// Sequence number of the notification in flight (guest).
pub const SEQ: usize = 0;
/// Guest TSC just before the notification (guest).
pub const SEND_TSC: usize = 1;
/// Path tag of the notification in flight (guest).
pub const PATH: usize = 2;
/// Last sequence number the host observed (host).
pub const ACK: usize = 3;
/// The guest's calibrated TSC frequency in kHz (guest, before the first one).
pub const TSC_KHZ: usize = 4;
/// Guest-side TSC cycles summed over path `p`'s notifications (guest, at its end).
#[must_use]
pub const fn cycles_word(p: u64) -> usize {
    8 + 2 * p as usize
}
/// How many notifications of path `p` were measured (guest, at its end).
#[must_use]
pub const fn count_word(p: u64) -> usize {
    9 + 2 * p as usize
}
/// Words in use.
pub const WORDS: usize = 32;
/// The mailbox is one page.
pub const MAILBOX_BYTES: u64 = 4096;

/// `StatsMark` labels around path `p`'s measured notifications.
#[must_use]
pub const fn mark_before(p: u64) -> u64 {
    0x100 + 2 * p
}
#[must_use]
pub const fn mark_after(p: u64) -> u64 {
    0x101 + 2 * p
}

const _: () = assert!(count_word(path::DOORBELL_PARKED) < WORDS);
const _: () = assert!(WORDS * 8 <= MAILBOX_BYTES as usize);
