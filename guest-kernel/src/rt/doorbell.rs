//! The event source manager (mechanism M1): events written into
//! memory the host watches, instead of a trapping notification.
//!
//! At start-up (ring 3) it reads the shim's discovery leaves, opens the para
//! region, waits for the "writing allowed" notification, takes a consistent
//! copy of the designation table and keeps the range meant for this guest's
//! vCPUs. Sending is one locked ring write (`Ring::send`); only when the
//! host's monitor had parked does it add the trapping kick, an MMIO store to
//! the range's kick address (an ioeventfd on the host). Under QEMU there is
//! no para region: it reports [`DoorbellError::Unavailable`] and drivers keep
//! using virtio's notify register.

use crate::abi::vector;
use crate::arch::BOOT;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use para_abi::discovery::{self, features};
use para_abi::doorbell::designation::{ANY_SOURCE, Designation, SourceType};
use para_abi::doorbell::record::Event;
use para_abi::doorbell::ring::{Ring, Sent, Via};
use para_abi::region::{ROUTE_CAPACITY, Region, Route, TABLE_CAPACITY};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellError {
    /// Not under the Exitless shim, or it offers no doorbells.
    Unavailable,
    /// The region or the table is not usable (says which).
    BadRegion(&'static str),
    /// The shim never allowed writing.
    NotAllowed,
    /// No range is designated for this guest's vCPUs.
    NoDesignation,
}

impl fmt::Display for DoorbellError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable => write!(
                f,
                "no doorbells here (not under the Exitless shim, or turned off)"
            ),
            Self::BadRegion(why) => write!(f, "para region unusable: {why}"),
            Self::NotAllowed => write!(f, "the shim did not allow writing to the doorbell ranges"),
            Self::NoDesignation => write!(f, "no doorbell range is designated for guest vCPUs"),
        }
    }
}

/// One vCPU range the guest may write into.
struct Lane {
    ring: Ring<'static>,
    /// The ring's slots (for [`Doorbells::send_raw`]).
    slots: *const AtomicU64,
    kick: *mut u32,
    designation: Designation,
    /// Designated for "any vCPU" now (a spare range is not, until a move).
    usable: AtomicBool,
}

/// Most vCPU ranges the manager keeps (the active one and spares it may be
/// moved to at run time).
const MAX_LANES: usize = 4;

/// The ranges this guest writes its events into.
pub struct Doorbells {
    region: Region<'static>,
    lanes: alloc::vec::Vec<Lane>,
    /// The lane designated for "any vCPU" now.
    current: AtomicUsize,
    /// The table generation `current` was chosen under.
    generation: AtomicU64,
    /// The shim's queue routes (`para_abi::region::Route` words, a copy):
    /// which host CPU serves each device queue.
    routes: [AtomicU64; ROUTE_CAPACITY],
    /// Events written into the range of the host CPU their queue's route named.
    routed: AtomicU64,
    sent: AtomicU64,
    overflowed: AtomicU64,
    kicks: AtomicU64,
    /// Designation notifications that moved us to another range.
    moves: AtomicU64,
    /// Notifications whose table named no range we know (we stay put).
    stale: AtomicU64,
    /// Sends held back while the shim withdrew writing.
    withheld: AtomicU64,
}

// SAFETY: the ring is views of atomics in shared memory (safe to use from
// every CPU at once: that is its purpose); the kick pointer is an MMIO
// address that is only ever stored to.
unsafe impl Sync for Doorbells {}
// SAFETY: as above.
unsafe impl Send for Doorbells {}

impl fmt::Debug for Doorbells {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Doorbells")
            .field("designation", &self.lane().designation)
            .finish_non_exhaustive()
    }
}

static DOORBELLS: spin::Once<Result<Doorbells, DoorbellError>> = spin::Once::new();

/// How long to wait for the shim's "writing allowed" notification.
const ALLOW_WAIT_POLLS: u32 = 1_000_000;

fn open() -> Result<Doorbells, DoorbellError> {
    if BOOT.under_shim.load(Ordering::Relaxed) == 0 {
        return Err(DoorbellError::Unavailable);
    }
    let f = crate::arch::cpu::cpuid(discovery::LEAF_FEATURES, 0);
    if f.eax & features::DOORBELLS == 0 || f.eax & features::PARA_REGION == 0 {
        return Err(DoorbellError::Unavailable);
    }
    let leaf = crate::arch::cpu::cpuid(discovery::LEAF_PARA_REGION, 0);
    let (gpa, size, _) =
        discovery::para_region_from_registers(leaf.eax, leaf.ebx, leaf.ecx, leaf.edx)
            .ok_or(DoorbellError::BadRegion("the para region leaf is empty"))?;
    let size = u64::from(size);
    let end = gpa
        .checked_add(size)
        .ok_or(DoorbellError::BadRegion("region wraps"))?;
    if gpa < para_abi::layout::PARA_REGION_BASE || end > para_abi::layout::MMIO_HOLE_START {
        return Err(DoorbellError::BadRegion(
            "region outside the range the guest maps for it",
        ));
    }
    // SAFETY: the range is identity-mapped for ring 3 (checked above) and the
    // shim keeps it for the VM's life; `open` validates magic and geometry.
    let region = unsafe { Region::open(gpa as *const u8, size) }
        .map_err(|_| DoorbellError::BadRegion("bad header"))?;
    let mut polls = 0;
    while !region.writing_allowed() {
        polls += 1;
        if polls > ALLOW_WAIT_POLLS {
            return Err(DoorbellError::NotAllowed);
        }
        core::hint::spin_loop();
    }
    let mut table = [None; TABLE_CAPACITY];
    region
        .snapshot(&mut table, 64)
        .map_err(|_| DoorbellError::BadRegion("the designation table stays torn"))?;
    let generation = region
        .snapshot(&mut table, 64)
        .map_err(|_| DoorbellError::BadRegion("the designation table stays torn"))?;
    let mut lanes = alloc::vec::Vec::with_capacity(MAX_LANES);
    for d in table
        .iter()
        .flatten()
        .filter(|d| d.source == SourceType::GuestVcpu)
        .take(MAX_LANES)
    {
        lanes.push(lane(d, gpa, end)?);
    }
    let current = current_lane(&table, &lanes).ok_or(DoorbellError::NoDesignation)?;
    mark_usable(&table, &lanes);
    let routes = [const { AtomicU64::new(0) }; ROUTE_CAPACITY];
    copy_routes(&region, &routes);
    if region.header.notify_vector.load(Ordering::Relaxed) == u32::from(vector::DOORBELL_NOTIFY) {
        crate::rt::irq::register(vector::DOORBELL_NOTIFY, on_designation_notify);
    }
    // A shim that can deliver M3 upcalls announces re-designations that way.
    crate::rt::upcall::register_upcall(
        crate::rt::upcall::Class::Redesignation,
        on_redesignation_upcall,
    );
    Ok(Doorbells {
        region,
        lanes,
        current: AtomicUsize::new(current),
        generation: AtomicU64::new(generation),
        routes,
        routed: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        overflowed: AtomicU64::new(0),
        kicks: AtomicU64::new(0),
        moves: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        withheld: AtomicU64::new(0),
    })
}

/// Checks designation `d` against the para region `[gpa, end)` and opens its ring.
fn lane(d: &Designation, gpa: u64, end: u64) -> Result<Lane, DoorbellError> {
    let layout = d
        .ring_layout()
        .map_err(|_| DoorbellError::BadRegion("ring layout"))?;
    let range_end = d
        .range_gpa
        .checked_add(d.range_len)
        .ok_or(DoorbellError::BadRegion("range wraps"))?;
    if d.range_gpa < gpa || range_end > end {
        return Err(DoorbellError::BadRegion("range outside the para region"));
    }
    let kick_ok = (para_abi::layout::KICK_BASE
        ..para_abi::layout::KICK_BASE + para_abi::layout::KICK_SPAN - 4)
        .contains(&d.kick_gpa)
        && d.kick_gpa.is_multiple_of(4);
    if !kick_ok {
        return Err(DoorbellError::BadRegion(
            "kick address outside the kick window",
        ));
    }
    // SAFETY: the range lies in the para region (checked), mapped for ring 3,
    // laid out as `layout` says (validated by `ring_layout`).
    let ring = unsafe { Ring::from_range(d.range_gpa as *const u8, &layout) }
        .map_err(|_| DoorbellError::BadRegion("ring misaligned"))?;
    Ok(Lane {
        ring,
        slots: (d.range_gpa + layout.slots_offset) as *const AtomicU64,
        kick: d.kick_gpa as *mut u32,
        designation: *d,
        usable: AtomicBool::new(false),
    })
}

/// Marks the lanes the table designates for "any vCPU" now as usable.
fn mark_usable(table: &[Option<Designation>], lanes: &[Lane]) {
    for l in lanes {
        let any = table.iter().flatten().any(|d| {
            d.range_gpa == l.designation.range_gpa
                && d.source == SourceType::GuestVcpu
                && d.source_id == ANY_SOURCE
        });
        l.usable.store(any, Ordering::Release);
    }
}

/// Copies the region's queue routes (free entries as 0); a table the host
/// keeps rewriting leaves the old copy.
fn copy_routes(region: &Region<'static>, into: &[AtomicU64; ROUTE_CAPACITY]) {
    let mut routes = [None; ROUTE_CAPACITY];
    if region.snapshot_routes(&mut routes, 64).is_ok() {
        for (r, slot) in routes.iter().zip(into) {
            slot.store(r.and_then(|r| r.encode()).unwrap_or(0), Ordering::Relaxed);
        }
    }
}

/// The lane the table designates for "any vCPU".
fn current_lane(table: &[Option<Designation>], lanes: &[Lane]) -> Option<usize> {
    let d = table
        .iter()
        .flatten()
        .find(|d| d.source == SourceType::GuestVcpu && d.source_id == ANY_SOURCE)?;
    lanes
        .iter()
        .position(|l| l.designation.range_gpa == d.range_gpa)
}

/// The designation notification (vector `DOORBELL_NOTIFY`, ring 3 upcall):
/// the host changed the table.
fn on_designation_notify(_vector: u8) {
    if let Some(Ok(d)) = DOORBELLS.get() {
        d.refresh();
    }
}

/// The designation notification as an M3 upcall (the shim prefers it to the
/// vector when this guest takes upcalls).
fn on_redesignation_upcall(_: crate::rt::upcall::Class, _: u32) {
    on_designation_notify(vector::DOORBELL_NOTIFY);
}

/// The doorbells, once set up (the first call sets them up).
pub fn get() -> Result<&'static Doorbells, DoorbellError> {
    DOORBELLS.call_once(open).as_ref().map_err(|e| *e)
}

impl Doorbells {
    /// True while the shim allows writing into the ranges (the memory
    /// writing notification): it withdraws it while it moves or stops a monitor.
    #[must_use]
    pub fn writing_allowed(&self) -> bool {
        self.region.writing_allowed()
    }

    /// [`Self::send`] if the shim allows writing now; `None` (nothing
    /// written, counted) while it has withdrawn that: the caller takes
    /// another path (the notify register) or tries again later.
    pub fn try_send(&self, event: Event) -> Option<Sent> {
        if !self.writing_allowed() {
            self.withheld.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.send(event))
    }

    /// Events [`Self::try_send`] held back while writing was withdrawn.
    #[must_use]
    pub fn withheld(&self) -> u64 {
        self.withheld.load(Ordering::Relaxed)
    }

    /// The shim's queue routes (this guest's copy).
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        self.routes
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .take_while(|&w| w != 0)
            .filter_map(Route::decode)
    }

    /// The host CPU the shim's route names for `device`'s queue `queue`.
    #[must_use]
    pub fn route(&self, device: u8, queue: u16) -> Option<u32> {
        self.routes()
            .find(|r| r.device == device && r.queue == queue)
            .map(|r| r.host_cpu)
    }

    /// The lane an event for `device`'s queue `queue` goes into: a usable
    /// range of the host CPU its route names (the association the guest
    /// keeps between ranges and host CPUs), else the "any vCPU" range.
    fn lane_for(&self, device: u8, queue: u16) -> (&Lane, bool) {
        if let Some(cpu) = self.route(device, queue)
            && let Some(l) = self
                .lanes
                .iter()
                .find(|l| l.designation.host_cpu == cpu && l.usable.load(Ordering::Acquire))
        {
            return (l, true);
        }
        (self.lane(), false)
    }

    /// The host CPU whose monitor gets events for `device`'s queue `queue`.
    #[must_use]
    pub fn host_cpu_for(&self, device: u8, queue: u16) -> u32 {
        self.lane_for(device, queue).0.designation.host_cpu
    }

    /// Events written into the range their queue's route named.
    #[must_use]
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Sends `event` to the host, into the range of the host CPU that serves
    /// its queue; kicks when that monitor was parked.
    pub fn send(&self, event: Event) -> Sent {
        let (lane, routed) = self.lane_for(event.device, event.queue);
        if routed {
            self.routed.fetch_add(1, Ordering::Relaxed);
        }
        let sent = lane.ring.send(event);
        self.sent.fetch_add(1, Ordering::Relaxed);
        if sent.via == Via::Overflow {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
        }
        if sent.kick {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the designated kick address (checked to lie in the kick
            // window, mapped uncached for ring 3); the store is the whole protocol.
            unsafe { core::ptr::write_volatile(lane.kick, 1) };
        }
        sent
    }

    /// Reserves the next ring position the way `Ring::send` does and stores
    /// `word(position)` there, whatever it is: how the shim's bad-input tests
    /// play a buggy or hostile producer (garbage, torn or misplaced records).
    /// False, and nothing written, when the ring is full.
    pub fn send_raw(&self, word: impl Fn(u64) -> u64) -> bool {
        let lane = self.lane();
        let head = lane.ring.status().head.load(Ordering::Acquire);
        let tail = &lane.ring.header().tail.0;
        let pos = tail.load(Ordering::Relaxed);
        if pos.wrapping_sub(head) >= self.capacity()
            || tail
                .compare_exchange(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return false;
        }
        let index = (pos & (self.capacity() - 1)) as usize;
        // SAFETY: `slots` is the ring's slot array (validated by `ring_layout` at
        // open), `index` < capacity, and position `pos` is ours alone.
        unsafe { (*lane.slots.add(index)).store(word(pos), Ordering::Release) };
        true
    }

    /// True when the host has consumed everything sent so far (ring and overflow set).
    #[must_use]
    pub fn drained(&self) -> bool {
        self.lanes.iter().all(|l| {
            let tail = l.ring.header().tail.0.load(Ordering::Acquire);
            let head = l.ring.status().head.load(Ordering::Acquire);
            head >= tail && l.ring.header().overflow_summary.load(Ordering::Acquire) == 0
        })
    }

    /// (events sent, of which coalesced on overflow, trapping kicks issued).
    #[must_use]
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.overflowed.load(Ordering::Relaxed),
            self.kicks.load(Ordering::Relaxed),
        )
    }

    /// Slots in the ring (events beyond what the host has consumed coalesce).
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.lane().ring.capacity()
    }

    /// The host CPU whose monitor consumes this guest's events.
    #[must_use]
    pub fn host_cpu(&self) -> u32 {
        self.lane().designation.host_cpu
    }

    fn lane(&self) -> &Lane {
        let i = self.current.load(Ordering::Acquire);
        &self.lanes[i.min(self.lanes.len() - 1)]
    }

    /// Re-reads the designation table (after a designation notification) and
    /// moves to the range now designated for "any vCPU". Events already in the
    /// old range stay there: the host keeps consuming it.
    pub fn refresh(&self) {
        let generation = self.region.generation();
        if generation == self.generation.load(Ordering::Acquire) {
            return;
        }
        let mut table = [None; TABLE_CAPACITY];
        let Ok(generation) = self.region.snapshot(&mut table, 64) else {
            self.stale.fetch_add(1, Ordering::Relaxed);
            return;
        };
        mark_usable(&table, &self.lanes);
        copy_routes(&self.region, &self.routes);
        match current_lane(&table, &self.lanes) {
            Some(i) => {
                if self.current.swap(i, Ordering::AcqRel) != i {
                    self.moves.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.stale.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.generation.store(generation, Ordering::Release);
    }

    /// (ranges the table designated for this guest's vCPUs at start-up, moves
    /// to another range after a notification, notifications naming no known range).
    #[must_use]
    pub fn designation_counters(&self) -> (usize, u64, u64) {
        (
            self.lanes.len(),
            self.moves.load(Ordering::Relaxed),
            self.stale.load(Ordering::Relaxed),
        )
    }
}
