//! Interrupt-vCPU hints (mechanism M2), guest half: the shim names,
//! per device queue, the vCPUs that share a host CPU with the thread producing
//! the queue's events. A driver follows a hint (points the queue's MSI-X entry
//! there) only where it names the vCPU that processes the queue: an interrupt
//! anywhere else would need a wake IPI to that vCPU, which costs more than the
//! hint saves (see [`Follower::check`]); other hints are declined and counted.
//!
//! The page is read-only to the guest and read from ring 3. A driver calls
//! [`Follower::check`] after an interrupt: a new (even, whole) generation is
//! acted on at most once; a torn record is left for the next interrupt; vCPUs
//! the guest does not have are ignored. `hints=off` on the kernel command line,
//! or no offer (QEMU), leaves the default placement alone.

use super::smp;
use super::start::system;
use crate::arch::BOOT;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use para_abi::discovery::{self, features};
use para_abi::hints::{Hints, PAGE_BYTES, ReadError, key};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintsError {
    /// Not under the Exitless shim, or it offers no hints.
    Unavailable,
    /// `hints=off` on the kernel command line.
    Off,
    /// The offered page is not usable (says why).
    BadPage(&'static str),
}

impl fmt::Display for HintsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable => write!(f, "no interrupt hints here (not offered)"),
            Self::Off => write!(f, "interrupt hints turned off (hints=off)"),
            Self::BadPage(why) => write!(f, "hints page unusable: {why}"),
        }
    }
}

static PAGE: spin::Once<Result<Hints<'static>, HintsError>> = spin::Once::new();

fn open() -> Result<Hints<'static>, HintsError> {
    if system().cmdline.get("hints") == Some("off") {
        return Err(HintsError::Off);
    }
    if BOOT.under_shim.load(Ordering::Relaxed) == 0 {
        return Err(HintsError::Unavailable);
    }
    let f = crate::arch::cpu::cpuid(discovery::LEAF_FEATURES, 0);
    if f.eax & features::HINTS == 0 {
        return Err(HintsError::Unavailable);
    }
    let l = crate::arch::cpu::cpuid(discovery::LEAF_HINTS, 0);
    let (gpa, size, version) = discovery::area_from_registers([l.eax, l.ebx, l.ecx, l.edx])
        .ok_or(HintsError::BadPage("the hints leaf is empty"))?;
    if version != para_abi::hints::VERSION {
        return Err(HintsError::BadPage("unknown version"));
    }
    if (size as usize) < PAGE_BYTES || gpa % 4096 != 0 {
        return Err(HintsError::BadPage("page too small or unaligned"));
    }
    let end = gpa + PAGE_BYTES as u64;
    if gpa < para_abi::layout::PARA_REGION_BASE || end > para_abi::layout::MMIO_HOLE_START {
        return Err(HintsError::BadPage(
            "page outside the range the guest maps for it",
        ));
    }
    // SAFETY: the range is identity-mapped for ring 3 (checked above), the shim
    // keeps it for the VM's life, and it is only read through atomics.
    unsafe { Hints::open(gpa as *const u8) }.map_err(|_| HintsError::BadPage("bad header"))
}

/// The hints page, opened on first use.
pub fn get() -> Result<Hints<'static>, HintsError> {
    *PAGE.call_once(open)
}

/// Decisions taken, over all queues (for reports).
static SEEN: AtomicU64 = AtomicU64::new(0);
static RETARGETED: AtomicU64 = AtomicU64::new(0);
static ALREADY: AtomicU64 = AtomicU64::new(0);
static IGNORED: AtomicU64 = AtomicU64::new(0);
static DECLINED: AtomicU64 = AtomicU64::new(0);
static TORN: AtomicU64 = AtomicU64::new(0);

/// What the guest did with hints so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// New hint generations read.
    pub seen: u64,
    /// Queue entries pointed at a hinted vCPU.
    pub retargeted: u64,
    /// Hints whose vCPU already took the interrupts.
    pub already: u64,
    /// Hints naming no vCPU this guest has (or none at all).
    pub ignored: u64,
    /// Hints naming only vCPUs other than the one that processes the queue:
    /// following one would cost a wake IPI per interrupt (see [`Follower::check`]).
    pub declined: u64,
    /// Reads that found the record mid-update (retried at a later interrupt).
    pub torn: u64,
}

#[must_use]
pub fn decisions() -> Decisions {
    Decisions {
        seen: SEEN.load(Ordering::Relaxed),
        retargeted: RETARGETED.load(Ordering::Relaxed),
        already: ALREADY.load(Ordering::Relaxed),
        ignored: IGNORED.load(Ordering::Relaxed),
        declined: DECLINED.load(Ordering::Relaxed),
        torn: TORN.load(Ordering::Relaxed),
    }
}

/// `state` for reports: `on`, `off` or `unavailable`.
#[must_use]
pub fn state() -> &'static str {
    match get() {
        Ok(_) => "on",
        Err(HintsError::Off) => "off",
        Err(_) => "unavailable",
    }
}

/// The CPU index of the online CPU with APIC id `apic`.
fn cpu_of(apic: u32) -> Option<usize> {
    (0..smp::online()).find(|&c| smp::apic_id(c) == Some(apic))
}

/// Follows one device queue's hint record.
#[derive(Debug)]
pub struct Follower {
    key: u32,
    record: Option<usize>,
    generation: u32,
    /// Where the queue's entry points (APIC id), as the driver last set it: kept
    /// here because reading the MSI-X table back costs exits.
    current: u32,
}

impl Follower {
    /// Follows queue `queue` of PCI device `device`, whose entry targets APIC id
    /// `current`.
    #[must_use]
    pub const fn new(device: u8, queue: u16, current: u32) -> Self {
        Self {
            key: key(device, queue),
            record: None,
            generation: 0,
            current,
        }
    }

    /// The driver pointed the entry at APIC id `apic` (on a hint or otherwise).
    pub fn set_current(&mut self, apic: u32) {
        self.current = apic;
    }

    /// Called after the queue's interrupt by the CPU `processing` that runs the
    /// queue's processing (the network stack): the CPU to retarget the entry
    /// to, when a new hint makes one better than where the entry points now.
    /// Each generation is decided once. Plain memory reads only: no exit.
    ///
    /// A hint is followed only where it lands on `processing`. An interrupt
    /// taken on any other vCPU has to wake the stack's vCPU with an IPI (in
    /// this guest an emulated ring-0 path and an exit on both sides), and that
    /// cost more than the host-side injection the hint saves: measured on a
    /// 2-core host, following a hint away from the stack made the ping-pong's
    /// RTT 2.8x worse, while a hint that brings interrupts placed elsewhere back
    /// to the stack's vCPU made it 2.3x better. So a hint naming only other
    /// vCPUs is declined (counted), and one naming `processing` is followed.
    pub fn check(&mut self, hints: &Hints<'_>, processing: usize) -> Option<usize> {
        let i = if let Some(i) = self.record {
            i
        } else {
            let i = hints.find(self.key)?;
            self.record = Some(i);
            i
        };
        let hint = match hints.records[i].read() {
            Ok(h) => h,
            Err(ReadError::Torn) => {
                TORN.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(ReadError::Empty | ReadError::Inconsistent) => return None,
        };
        if hint.generation == self.generation || hint.key != self.key {
            return None;
        }
        self.generation = hint.generation;
        SEEN.fetch_add(1, Ordering::Relaxed);
        if hint.apics.contains(self.current) {
            ALREADY.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if hint.apics.iter().find_map(cpu_of).is_none() {
            IGNORED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match smp::apic_id(processing) {
            Some(apic) if hint.apics.contains(apic) => {
                RETARGETED.fetch_add(1, Ordering::Relaxed);
                Some(processing)
            }
            _ => {
                DECLINED.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}
