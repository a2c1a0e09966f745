//! The memory instruction manager of M1 (`para_abi::region`): where the para
//! region and each designated range lie, which parts the guest may write, the kick
//! addresses, and the host memory behind it all.
//!
//! Layout of the para region at [`PARA_REGION_BASE`] (every piece page aligned):
//!
//! ```text
//! +0          control page: RegionHeader + designation table      read-only slot
//! then, per designation i (standard layout, Designation::standard):
//!             protected page: RingStatus                         read-only slot
//!             RingHeader + slots (2048 × 8 B)                    writable slot
//! ```
//!
//! Adjacent pieces of the same mode share a memslot, so one designation costs two
//! slots (control + protected page, ring) and each further one two more. The kick
//! address of designation `i` is `KICK_BASE + i * KICK_STRIDE`, an MMIO address
//! without memslot bound to an ioeventfd.

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use para_abi::doorbell::designation::DesignationError;
use para_abi::doorbell::ring::MAX_CAPACITY;
use para_abi::doorbell::{Consumer, Designation, Ring, SourceType};
use para_abi::layout::{KICK_BASE, KICK_SPAN, PARA_REGION_BASE, PARA_REGION_MAX};
use para_abi::region::{CONTROL_SIZE, Region, TABLE_CAPACITY};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::memory::SharedMapping;

/// Slots per ring: the most the protocol allows, so that a burst from ring 3
/// fills the ring before it coalesces (2048 × 8 B = 16 KiB).
pub const RING_CAPACITY: u32 = MAX_CAPACITY;
/// Bytes between two kick addresses.
pub const KICK_STRIDE: u64 = 8;
/// Bytes a kick write must have to hit the ioeventfd.
pub const KICK_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0} designations requested; the table holds {TABLE_CAPACITY}")]
    TooMany(usize),
    #[error("the para region would take {0:#x} bytes; at most {PARA_REGION_MAX:#x} fit")]
    TooBig(u64),
    #[error("designation {index} is malformed: {error:?}")]
    BadDesignation {
        index: usize,
        error: DesignationError,
    },
    #[error("mapping the para region failed: {0}")]
    Map(std::io::Error),
    #[error("creating a kick eventfd failed: {0}")]
    EventFd(std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for the para region (slot {slot}): {source}")]
    Slot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD for the kick at {addr:#x}: {source}")]
    Ioeventfd {
        addr: u64,
        source: kvm_ioctls::Error,
    },
}

/// One range the manager is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub source: SourceType,
    pub source_id: u32,
    /// The host CPU whose monitor consumes the range.
    pub host_cpu: u32,
}

/// A memslot's worth of the region: `len` bytes at `offset` from the region base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotSpec {
    pub offset: u64,
    pub len: u64,
    pub readonly: bool,
}

/// Where everything goes (pure: no memory, no KVM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Guest-physical base of the region.
    pub base: u64,
    /// Bytes of the region (page multiple).
    pub size: u64,
    pub designations: Vec<Designation>,
    pub slots: Vec<SlotSpec>,
}

/// Places the control page and one standard range per request.
pub fn plan(requests: &[Request]) -> Result<Plan, ManagerError> {
    if requests.len() > TABLE_CAPACITY {
        return Err(ManagerError::TooMany(requests.len()));
    }
    let mut pieces = vec![SlotSpec {
        offset: 0,
        len: CONTROL_SIZE as u64,
        readonly: true,
    }];
    let mut next = CONTROL_SIZE as u64;
    let mut designations = Vec::with_capacity(requests.len());
    for (index, r) in requests.iter().enumerate() {
        let d = if r.source == SourceType::GuestVcpu {
            Designation::standard(
                r.source,
                r.source_id,
                r.host_cpu,
                PARA_REGION_BASE + next,
                RING_CAPACITY,
                KICK_BASE + index as u64 * KICK_STRIDE,
            )
        } else {
            // Other host threads' range (reference text claims 2 and 6): the
            // ring in the protected portion, no guest kick.
            Designation::host_written(
                r.source,
                r.source_id,
                r.host_cpu,
                PARA_REGION_BASE + next,
                RING_CAPACITY,
            )
        };
        d.ring_layout()
            .map_err(|error| ManagerError::BadDesignation { index, error })?;
        let protected = u64::from(d.protected_len);
        pieces.push(SlotSpec {
            offset: next,
            len: protected,
            readonly: true,
        });
        pieces.push(SlotSpec {
            offset: next + protected,
            len: d.range_len - protected,
            readonly: false,
        });
        next += d.range_len;
        designations.push(d);
    }
    if next > PARA_REGION_MAX {
        return Err(ManagerError::TooBig(next));
    }
    let kicks_end = KICK_STRIDE * requests.len() as u64;
    if kicks_end > KICK_SPAN {
        return Err(ManagerError::TooMany(requests.len()));
    }
    Ok(Plan {
        base: PARA_REGION_BASE,
        size: next,
        designations,
        slots: merge(&pieces),
    })
}

/// Joins adjacent pieces of the same mode.
fn merge(pieces: &[SlotSpec]) -> Vec<SlotSpec> {
    let mut out: Vec<SlotSpec> = Vec::with_capacity(pieces.len());
    for p in pieces.iter().filter(|p| p.len > 0) {
        match out.last_mut() {
            Some(last) if last.readonly == p.readonly && last.offset + last.len == p.offset => {
                last.len += p.len;
            }
            _ => out.push(*p),
        }
    }
    out
}

/// The region of one guest: host memory, the published table, the kick eventfds.
pub struct ParaRegion {
    mem: SharedMapping,
    pub plan: Plan,
    /// Per designation: the eventfd its kick address signals.
    pub kicks: Vec<EventFd>,
}

impl ParaRegion {
    /// Allocates the region, writes the header, zeroes every ring, publishes the
    /// designations and the writing notification. The guest runs nothing yet.
    pub fn new(plan: Plan) -> Result<Self, ManagerError> {
        let len = usize::try_from(plan.size).map_err(|_| ManagerError::TooBig(plan.size))?;
        let mem = SharedMapping::new(len).map_err(ManagerError::Map)?;
        let kicks = plan
            .designations
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(ManagerError::EventFd)?;
        let me = Self { mem, plan, kicks };
        let region = me.control();
        region.init(me.plan.size, 0);
        for i in 0..me.plan.designations.len() {
            if let Some(ring) = me.ring(i) {
                Consumer::new().reset(&ring);
            }
        }
        region.designate(&me.plan.designations);
        region.set_writing_allowed(true);
        Ok(me)
    }

    /// The header and table.
    #[must_use]
    pub fn control(&self) -> Region<'_> {
        // SAFETY: the mapping is page aligned and at least CONTROL_SIZE bytes (the
        // plan always has the control page), lives as long as `&self`, and is only
        // accessed atomically.
        unsafe { Region::from_raw(self.mem.as_ptr()) }
    }

    /// The ring of designation `i`, `None` past the last one.
    #[must_use]
    pub fn ring(&self, i: usize) -> Option<Ring<'_>> {
        let d = self.plan.designations.get(i)?;
        let layout = d.ring_layout().ok()?;
        let offset = usize::try_from(d.range_gpa.checked_sub(self.plan.base)?).ok()?;
        if offset.checked_add(usize::try_from(d.range_len).ok()?)? > self.mem.len() {
            return None;
        }
        // SAFETY: the range lies inside the mapping (checked above), which lives as
        // long as the returned ring borrows `self`; the layout is validated; the ring
        // words are only accessed atomically (here and by the guest's locked stores).
        unsafe { Ring::from_range(self.mem.as_ptr().add(offset), &layout) }.ok()
    }

    /// Maps the region into the VM (slots from `first_slot`, read-only where the
    /// plan says). [`ParaRegion::bind_kicks`] binds the kick addresses.
    pub fn register(&self, vm: &VmFd, first_slot: u32) -> Result<(), ManagerError> {
        for (i, s) in self.plan.slots.iter().enumerate() {
            let slot = first_slot + i as u32;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: if s.readonly { KVM_MEM_READONLY } else { 0 },
                guest_phys_addr: self.plan.base + s.offset,
                memory_size: s.len,
                userspace_addr: self.mem.as_ptr() as u64 + s.offset,
            };
            // SAFETY: the host range lies in `self.mem` (the plan's slots cover
            // exactly the region), which the guest keeps alive for as long as the VM.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| ManagerError::Slot { slot, source })?;
        }
        Ok(())
    }

    /// Binds each kick address to its eventfd. Called after every memory slot
    /// of the VM is in place: a memory-slot change that follows an I/O-bus
    /// change (ioeventfd, irqfd) waits for the SRCU grace period that change
    /// started, measured at 5–15 ms per slot on this project's hosts.
    pub fn bind_kicks(&self, vm: &VmFd) -> Result<(), ManagerError> {
        // Host-written ranges have no guest kick: their producers write the eventfd.
        for (d, e) in self
            .plan
            .designations
            .iter()
            .zip(&self.kicks)
            .filter(|(d, _)| d.guest_writes())
        {
            vm.register_ioevent(e, &IoEventAddress::Mmio(d.kick_gpa), NoDatamatch)
                .map_err(|source| ManagerError::Ioeventfd {
                    addr: d.kick_gpa,
                    source,
                })?;
        }
        Ok(())
    }

    /// True when `addr` lies in the region.
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        (self.plan.base..self.plan.base + self.plan.size).contains(&addr)
    }

    /// The designation whose kick address is `addr`.
    #[must_use]
    pub fn kick_at(&self, addr: u64) -> Option<&EventFd> {
        let i = self
            .plan
            .designations
            .iter()
            .position(|d| d.guest_writes() && d.kick_gpa == addr)?;
        self.kicks.get(i)
    }
}

/// Fuzzing entry (feature `fuzzing`): the guest's stores to its rings.
#[cfg(feature = "fuzzing")]
impl ParaRegion {
    /// Stores `value` at the 8-byte-aligned `offset` of designation `i`'s
    /// range, past its protected (read-only to the guest) pages, as a guest
    /// may at any time; `false` when that is outside the guest-writable part.
    #[must_use]
    pub fn fuzz_guest_store(&self, i: usize, offset: u64, value: u64) -> bool {
        let Some(d) = self.plan.designations.get(i) else {
            return false;
        };
        let offset = offset & !7;
        if offset < u64::from(d.protected_len) || offset + 8 > d.range_len {
            return false;
        }
        let Some(at) = d
            .range_gpa
            .checked_sub(self.plan.base)
            .and_then(|start| usize::try_from(start + offset).ok())
            .filter(|&at| at + 8 <= self.mem.len())
        else {
            return false;
        };
        // SAFETY: inside the mapping (checked above), 8-byte aligned (page-aligned
        // mapping, aligned range and offset), and only ever accessed atomically.
        #[allow(clippy::cast_ptr_alignment)]
        let word = unsafe {
            &*self
                .mem
                .as_ptr()
                .add(at)
                .cast::<std::sync::atomic::AtomicU64>()
        };
        word.store(value, std::sync::atomic::Ordering::Release);
        true
    }
}

/// A region with one range for any guest vCPU, monitored on host CPU 0.
#[cfg(test)]
pub(crate) fn test_region() -> std::sync::Arc<ParaRegion> {
    let request = Request {
        source: SourceType::GuestVcpu,
        source_id: para_abi::doorbell::designation::ANY_SOURCE,
        host_cpu: 0,
    };
    std::sync::Arc::new(
        ParaRegion::new(plan(&[request]).expect("one range plans")).expect("region maps"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use para_abi::doorbell::designation::{ANY_SOURCE, PAGE_SIZE};
    use para_abi::doorbell::{Event, Op, Polled};

    fn req(cpu: u32) -> Request {
        Request {
            source: SourceType::GuestVcpu,
            source_id: ANY_SOURCE,
            host_cpu: cpu,
        }
    }

    #[test]
    fn one_designation_layout_and_slots() {
        let p = plan(&[req(1)]).unwrap();
        assert_eq!(p.base, PARA_REGION_BASE);
        let d = p.designations[0];
        assert_eq!(d.range_gpa, PARA_REGION_BASE + PAGE_SIZE);
        assert_eq!(d.host_cpu, 1);
        assert_eq!(d.source, SourceType::GuestVcpu);
        assert_eq!(d.source_id, ANY_SOURCE);
        assert_eq!(d.ring_capacity, RING_CAPACITY);
        assert_eq!(d.kick_gpa, KICK_BASE);
        assert_eq!(u64::from(d.protected_len), PAGE_SIZE);
        // 4 KiB status + 256 B header + 16 KiB slots -> 6 pages.
        assert_eq!(d.range_len, 6 * PAGE_SIZE);
        assert_eq!(p.size, 7 * PAGE_SIZE);
        // Control page and the protected page merge into one read-only slot.
        assert_eq!(
            p.slots,
            [
                SlotSpec {
                    offset: 0,
                    len: 2 * PAGE_SIZE,
                    readonly: true
                },
                SlotSpec {
                    offset: 2 * PAGE_SIZE,
                    len: 5 * PAGE_SIZE,
                    readonly: false
                },
            ]
        );
        assert!(p.size <= PARA_REGION_MAX);
    }

    #[test]
    fn several_designations_alternate_slots_and_get_own_kicks() {
        let p = plan(&[req(0), req(1), req(0)]).unwrap();
        assert_eq!(p.slots.len(), 6);
        assert!(p.slots.iter().step_by(2).all(|s| s.readonly));
        assert!(p.slots.iter().skip(1).step_by(2).all(|s| !s.readonly));
        // Slots tile the region without gaps or overlap.
        let mut at = 0;
        for s in &p.slots {
            assert_eq!(s.offset, at);
            at += s.len;
        }
        assert_eq!(at, p.size);
        let kicks: Vec<u64> = p.designations.iter().map(|d| d.kick_gpa).collect();
        assert_eq!(kicks, [KICK_BASE, KICK_BASE + 8, KICK_BASE + 16]);
        for (d, s) in p.designations.iter().zip(p.slots.iter().step_by(2)) {
            // Each protected page is read-only and holds the status.
            let ro_end = p.base + s.offset + s.len;
            assert!(d.range_gpa + u64::from(d.protected_len) <= ro_end);
            assert!(d.range_gpa >= p.base + s.offset);
        }
        assert!(matches!(
            plan(&vec![req(0); TABLE_CAPACITY + 1]),
            Err(ManagerError::TooMany(_))
        ));
        assert!(plan(&[]).unwrap().designations.is_empty());
    }

    #[test]
    fn region_publishes_table_and_rings_work() {
        let r = ParaRegion::new(plan(&[req(1)]).unwrap()).unwrap();
        let control = r.control();
        assert!(control.check().is_ok());
        assert!(control.writing_allowed());
        let mut table = [None; TABLE_CAPACITY];
        control.snapshot(&mut table, 4).unwrap();
        assert_eq!(table[0], Some(r.plan.designations[0]));
        assert!(table[1..].iter().all(Option::is_none));
        let ring = r.ring(0).unwrap();
        assert_eq!(ring.capacity(), u64::from(RING_CAPACITY));
        let _ = ring.send(Event::new(1, 1, Op::Notify));
        let mut c = Consumer::new();
        assert_eq!(c.poll(&ring), Polled::Event(Event::new(1, 1, Op::Notify)));
        assert!(r.ring(1).is_none());
        assert!(r.contains(PARA_REGION_BASE) && !r.contains(PARA_REGION_BASE + r.plan.size));
        assert!(r.kick_at(KICK_BASE).is_some() && r.kick_at(KICK_BASE + 4).is_none());
    }
}
