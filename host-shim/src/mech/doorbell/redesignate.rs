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
    /// Moves whose old range was not drained within [`DRAIN_LIMIT`] (its
    /// monitor keeps serving it, so nothing is lost; counted to be seen).
    undrained: std::sync::atomic::AtomicU64,
}

/// How long a move waits for the old range's monitor to consume what was
/// written before the writing permission was withdrawn.
pub const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(20);

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
            undrained: std::sync::atomic::AtomicU64::new(0),
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
        // The memory writing notification, withdrawn for the move: the guest
        // sends through the notify register meanwhile (or waits, for events
        // with no register). What it wrote before is consumed first.
        self.region.control().set_writing_allowed(false);
        if !self.drain(a) {
            self.undrained
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                guest,
                "doorbell move: the old range was not drained in time; its monitor keeps serving it"
            );
        }
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
        // Granted again once the new range is designated and announced.
        self.region.control().set_writing_allowed(true);
        Status::Ok
    }

    /// Waits (bounded by [`DRAIN_LIMIT`]) until range `index`'s monitor has
    /// consumed every record and overflow entry written into it.
    fn drain(&self, index: usize) -> bool {
        use std::sync::atomic::Ordering;
        let Some(ring) = self.region.ring(index) else {
            return true;
        };
        let until = std::time::Instant::now() + DRAIN_LIMIT;
        loop {
            let tail = ring.header().tail.0.load(Ordering::Acquire);
            let head = ring.status().head.load(Ordering::Acquire);
            let overflow = ring.header().overflow_summary.load(Ordering::Acquire);
            if head >= tail && overflow == 0 {
                return true;
            }
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Moves whose old range was not drained in time.
    #[must_use]
    pub fn undrained(&self) -> u64 {
        self.undrained.load(std::sync::atomic::Ordering::Relaxed)
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
        assert!(c.writing_allowed(), "granted again after the move");
        assert_eq!(r.undrained(), 0, "an empty range drains at once");
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

    /// A producer that honours the writing permission writes events into the
    /// "any vCPU" range while moves withdraw and grant it; a consumer serves
    /// both ranges. Every event arrives exactly once, and the producer saw the
    /// permission withdrawn.
    #[test]
    fn a_move_under_traffic_withdraws_writing_and_loses_nothing() {
        use crate::mech::doorbell::monitor::RingTask;
        use crate::mech::doorbell::{GuestDoorbells, Target};
        use para_abi::doorbell::record::{Event, Op};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

        let region = Arc::new(ParaRegion::new(plan(&requests(1, 0)).unwrap()).unwrap());
        let moves = Arc::new(Redesignation::new(region.clone(), None));
        let guest = Arc::new(GuestDoorbells::new("t", Vec::<Target>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_producer = Arc::new(AtomicBool::new(false));
        // The consumer: both ranges, like their two monitors.
        let consumer = {
            let (region, guest, stop) = (region.clone(), guest.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut tasks: Vec<RingTask> = (0..2)
                    .map(|i| RingTask::new(region.clone(), i, guest.clone()).unwrap())
                    .collect();
                while !stop.load(Ordering::Acquire) {
                    for task in &mut tasks {
                        task.serve(64);
                    }
                }
                for task in &mut tasks {
                    task.serve(usize::MAX);
                }
            })
        };
        // The producer: the guest's rule — write only while allowed, into
        // the range the table names for any vCPU now.
        let sent = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let producer = {
            let (region, stop, sent, refused) = (
                region.clone(),
                stop_producer.clone(),
                sent.clone(),
                refused.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let c = region.control();
                    if !c.writing_allowed() {
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                        continue;
                    }
                    let mut t = [None; TABLE_CAPACITY];
                    if c.snapshot(&mut t, 8).is_err() {
                        continue;
                    }
                    let Some(i) = t
                        .iter()
                        .position(|d| d.is_some_and(|d| d.source_id == ANY_SOURCE))
                    else {
                        continue;
                    };
                    let ring = region.ring(i).unwrap();
                    // Stay clear of a full ring: coalesced overflow entries
                    // are "at least one" and could not be counted.
                    let tail = ring.header().tail.0.load(Ordering::Acquire);
                    if tail.wrapping_sub(ring.status().head.load(Ordering::Acquire)) >= 32 {
                        std::thread::yield_now();
                        continue;
                    }
                    let e = Event {
                        device: crate::mech::doorbell::SINK,
                        queue: 0,
                        op: Op::Notify,
                        arg: 0,
                    };
                    let out = ring.send(e);
                    assert!(matches!(out.via, para_abi::doorbell::ring::Via::Ring(_)));
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            // The announcement runs inside the move: writing is withdrawn then.
            let control = region.control();
            assert_eq!(
                moves.swap("t", || {
                    assert!(!control.writing_allowed(), "withdrawn during the move");
                    false
                }),
                Status::Ok
            );
            assert!(control.writing_allowed(), "granted after the move");
        }
        // The producer first: the consumer's last pass must come after its
        // last event.
        stop_producer.store(true, Ordering::Release);
        producer.join().unwrap();
        stop.store(true, Ordering::Release);
        consumer.join().unwrap();
        let sunk = guest.snapshot().sink_events;
        assert!(sent.load(Ordering::Relaxed) > 0);
        // How often the producer found writing withdrawn depends on timing
        // (the drain is short when the consumer keeps up): shown, not asserted.
        println!(
            "sent {} events across 50 moves; writing found withdrawn {} times",
            sent.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed)
        );
        assert_eq!(
            sunk,
            sent.load(Ordering::Relaxed),
            "every event exactly once"
        );
        assert!(region.control().writing_allowed());
    }
}
