//! Run-time re-designation of M1 doorbell ranges (`--doorbell-redesignate`).
//!
//! With the flag every guest gets a second vCPU ring, designated to the monitor
//! of another host CPU under a reserved source id ([`SPARE_SOURCE`]) that the
//! guest's event source manager does not write to. The `DoorbellRedesignate`
//! hypercall (21) swaps the two: the spare becomes the range for "any vCPU" and
//! the old one is retired. The table is rewritten under one odd/even bump of its
//! generation (the seqlock the guest snapshots under) and the designation
//! notification vector (`notify_vector` in the region header, `para_abi::region`) is
//! raised on every vCPU as a fixed, edge-triggered MSI through KVM_SIGNAL_MSI
//! (KVM api.rst §4.71; message format SDM vol 3 §11.11.1–2), so it needs no
//! LINT0/ExtINT set-up in the guest; the guest re-reads the table and moves to the new
//! range. When the guest takes M3 upcalls, the notification is an
//! `UpcallClass::Redesignation` upcall instead (delivered at an open interrupt
//! window, exactly once, M3); the MSI remains the fallback for a
//! guest without them. Both rings stay served by their monitors, so an event written into
//! the old ring before the guest noticed is still consumed: none is lost.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use para_abi::doorbell::designation::ANY_SOURCE;
use para_abi::doorbell::{Designation, SourceType};
use para_abi::hypercall::Status;

use super::manager::{ParaRegion, Request};
use crate::sync::lock;

/// The source id of the spare (not yet used) and retired designations.
pub const SPARE_SOURCE: u32 = 0xFFFF_FFFE;
/// The vector the guest kernel takes designation notifications on
/// (`guest_kernel::abi::vector::DOORBELL_NOTIFY`).
pub const NOTIFY_VECTOR: u8 = 0x34;

/// The requests for a guest whose monitor runs on `cpu`, with a spare on `spare_cpu`.
#[must_use]
pub fn requests(cpu: usize, spare_cpu: usize) -> Vec<Request> {
    vec![
        Request {
            source: SourceType::GuestVcpu,
            source_id: ANY_SOURCE,
            host_cpu: cpu as u32,
        },
        Request {
            source: SourceType::GuestVcpu,
            source_id: SPARE_SOURCE,
            host_cpu: spare_cpu as u32,
        },
    ]
}

/// One guest's re-designation state.
pub struct Redesignation {
    region: Arc<ParaRegion>,
    table: Mutex<Vec<Designation>>,
    /// Where the notification goes: the VM and its vCPU count (APIC ids 0..n).
    vm: Option<(Arc<VmFd>, u32)>,
    /// Re-designations announced by an M3 upcall rather than the MSI.
    upcalls: std::sync::atomic::AtomicU64,
}

impl Redesignation {
    /// Takes over the table `region` published and announces the notify vector.
    #[must_use]
    pub fn new(region: Arc<ParaRegion>, vm: Option<(Arc<VmFd>, u32)>) -> Self {
        let table = region.plan.designations.clone();
        region.control().header.notify_vector.store(
            u32::from(NOTIFY_VECTOR),
            std::sync::atomic::Ordering::Release,
        );
        Self {
            region,
            table: Mutex::new(table),
            vm,
            upcalls: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Swaps the guest's active and spare vCPU ranges and notifies the guest:
    /// through `upcall` (which posts a Redesignation upcall and says whether it
    /// could), or else by the notify MSI on every vCPU. Returns the status for
    /// the guest.
    pub fn swap(&self, guest: &str, upcall: impl FnOnce() -> bool) -> Status {
        let mut t = lock(&self.table);
        let active = t
            .iter()
            .position(|d| d.source == SourceType::GuestVcpu && d.source_id == ANY_SOURCE);
        let spare = t
            .iter()
            .position(|d| d.source == SourceType::GuestVcpu && d.source_id == SPARE_SOURCE);
        let (Some(a), Some(s)) = (active, spare) else {
            return Status::BadArgument;
        };
        t[a].source_id = SPARE_SOURCE;
        t[s].source_id = ANY_SOURCE;
        let generation = self.region.control().designate(&t);
        crate::guest_log!(
            info,
            guest,
            generation,
            from_cpu = t[a].host_cpu,
            to_cpu = t[s].host_cpu,
            "doorbell range re-designated"
        );
        if upcall() {
            self.upcalls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.notify(guest);
        }
        Status::Ok
    }

    /// Re-designations announced by an M3 upcall (the rest used the MSI).
    #[must_use]
    pub fn by_upcall(&self) -> u64 {
        self.upcalls.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn notify(&self, guest: &str) {
        let Some((vm, vcpus)) = &self.vm else { return };
        for apic_id in 0..*vcpus {
            let msi = kvm_msi {
                // Physical destination mode, destination = APIC id (bits 12..20).
                address_lo: 0xFEE0_0000 | (apic_id << 12),
                address_hi: 0,
                // Fixed delivery, edge, the vector in bits 0..8.
                data: u32::from(NOTIFY_VECTOR),
                ..Default::default()
            };
            if let Err(e) = vm.signal_msi(msi) {
                crate::guest_log!(
                    warn,
                    guest,
                    apic_id,
                    "KVM_SIGNAL_MSI for the designation notification: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mech::doorbell::manager::plan;
    use para_abi::region::TABLE_CAPACITY;

    #[test]
    fn swap_moves_any_source_and_bumps_the_generation() {
        let region = Arc::new(ParaRegion::new(plan(&requests(1, 0)).unwrap()).unwrap());
        let r = Redesignation::new(region.clone(), None);
        let c = region.control();
        assert_eq!(
            c.header
                .notify_vector
                .load(std::sync::atomic::Ordering::Relaxed),
            0x34
        );
        let g0 = c.generation();
        let mut before = [None; TABLE_CAPACITY];
        c.snapshot(&mut before, 4).unwrap();
        let any = |t: &[Option<Designation>]| {
            t.iter()
                .flatten()
                .find(|d| d.source_id == ANY_SOURCE)
                .map(|d| (d.range_gpa, d.host_cpu))
        };
        assert_eq!(any(&before).unwrap().1, 1);
        assert_eq!(r.swap("t", || false), Status::Ok);
        assert_eq!(r.by_upcall(), 0);
        let mut after = [None; TABLE_CAPACITY];
        c.snapshot(&mut after, 4).unwrap();
        assert!(c.generation() > g0 && c.generation().is_multiple_of(2));
        let (gpa0, _) = any(&before).unwrap();
        let (gpa1, cpu1) = any(&after).unwrap();
        assert_ne!(gpa0, gpa1);
        assert_eq!(cpu1, 0);
        // And back, announced by an upcall this time.
        assert_eq!(r.swap("t", || true), Status::Ok);
        assert_eq!(r.by_upcall(), 1);
        let mut again = [None; TABLE_CAPACITY];
        c.snapshot(&mut again, 4).unwrap();
        assert_eq!(any(&again), any(&before));
    }
}
