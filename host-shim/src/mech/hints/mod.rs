//! M2 interrupt-vCPU hints, host half (`para_abi::hints`; reference text
//! US9411624 claim 1): the I/O thread of a device queue, about to raise the queue's MSI,
//! looks up which of the VM's vCPUs run on the host CPU it runs on itself and,
//! the first time the queue signals and whenever that answer changes, publishes
//! them in the queue's hint record before the interrupt goes out. The guest may
//! then point the queue's MSI-X entry at one of them.
//!
//! The VCPU → host CPU mapping is `VcpuShared::host_cpu`, which every vCPU thread
//! stores (`sched_getcpu`) as it enters the guest; with `--pin` it is fixed.
//! "The I/O thread" is the NIC worker (`devices::net`), which takes frames off the
//! switch and fills the RX ring: it is the thread whose CPU the RX event comes from.
//! `--io-cpu` pins it; [`IoPlacement::move_to`] moves it while the guest runs.

pub mod report;

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use para_abi::discovery::{LEAF_HINTS, area_registers, features};
use para_abi::hints::{ApicSet, CAPACITY, Hints, PAGE_BYTES, key};
use para_abi::layout::area;
use tracing::{info, warn};

pub use report::{HintsReport, QueueReport};

use crate::counters::Tally;
use crate::kvm::cpuid::Offer;
use crate::kvm::memory::{SharedMapping, slot};
use crate::mech::{Mechanism, UpcallClass, Upcaller};
use crate::platform::MmioDevice;
use crate::report::GuestReport;
use crate::sync::lock;
use crate::vcpu::handle::{VcpuShared, pin_current_thread};

/// A queue's hint is republished at most this often: a thread the host bounces
/// between CPUs must not make the guest rewrite its MSI-X table per packet.
pub const MIN_HINT_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum HintsError {
    #[error("mapping the hints page failed: {0}")]
    Map(std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION (hints slot {slot}): {source}")]
    Slot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// One page of host memory, mapped read-only into the guest at `area::HINTS`.
struct Page {
    mem: SharedMapping,
}

impl Page {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            mem: SharedMapping::new(PAGE_BYTES)?,
        })
    }

    fn hints(&self) -> Hints<'_> {
        // SAFETY: page aligned, PAGE_BYTES long, alive as long as `&self`, and only
        // accessed atomically (the guest reads it through a read-only slot).
        unsafe { Hints::from_ptr(self.mem.as_ptr()) }
    }
}

/// Where the guest's I/O thread should run: -1 = wherever the host puts it.
#[derive(Debug)]
pub struct IoPlacement {
    want: AtomicI32,
    /// Times the I/O thread changed its affinity.
    pub moves: AtomicU64,
    /// Move to `.1` once the guest's queues have raised `.0` interrupts (a
    /// run-time move that does not depend on timing, for tests).
    move_after_irqs: Option<(u64, usize)>,
    irqs: AtomicU64,
}

impl IoPlacement {
    #[must_use]
    pub fn new(cpu: Option<usize>) -> Self {
        Self {
            want: AtomicI32::new(cpu.and_then(|c| i32::try_from(c).ok()).unwrap_or(-1)),
            moves: AtomicU64::new(0),
            move_after_irqs: None,
            irqs: AtomicU64::new(0),
        }
    }

    /// As [`IoPlacement::new`], moving to `to` after `irqs` interrupts.
    #[must_use]
    pub fn with_move_after_irqs(cpu: Option<usize>, irqs: u64, to: usize) -> Self {
        Self {
            move_after_irqs: Some((irqs, to)),
            ..Self::new(cpu)
        }
    }

    /// One more interrupt raised by the guest's I/O thread.
    fn count_irq(&self) {
        let n = self.irqs.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some((after, to)) = self.move_after_irqs
            && n == after
        {
            info!(cpu = to, irqs = n, "moving the I/O thread");
            self.move_to(to);
        }
    }

    /// Asks the I/O thread to move to `cpu`; it does so at its next event.
    pub fn move_to(&self, cpu: usize) {
        self.want
            .store(i32::try_from(cpu).unwrap_or(-1), Ordering::Release);
    }

    #[must_use]
    pub fn wanted(&self) -> Option<usize> {
        usize::try_from(self.want.load(Ordering::Acquire)).ok()
    }
}

/// Counters of one device queue.
#[derive(Debug)]
struct QueueStats {
    device: u8,
    queue: u16,
    /// Hint records published.
    sent: AtomicU64,
    /// Hints after which the MSI-X entry pointed at a hinted vCPU (counted once
    /// per hint, seen from the destination of the next interrupts).
    honoured: AtomicU64,
    /// Changes of the host CPU or vCPU set that came sooner than
    /// [`MIN_HINT_INTERVAL`] and were published later.
    deferred: AtomicU64,
    /// Hints announced to the guest by an M3 `HintUpdate` upcall.
    announced: AtomicU64,
    /// Interrupts raised per destination APIC id (from the MSI-X address).
    irqs_by_apic: Vec<AtomicU64>,
    /// Interrupts whose destination ran on the I/O thread's CPU when raised.
    irqs_colocated: AtomicU64,
    /// The last hint: host CPU and APIC ids.
    last: Mutex<Option<(i32, Vec<u32>)>>,
}

/// One guest's hints page, mapping source and counters.
pub struct GuestHints {
    name: String,
    page: Page,
    vcpus: Vec<Arc<VcpuShared>>,
    queues: Mutex<Vec<Arc<QueueStats>>>,
    pub io: Arc<IoPlacement>,
    /// The page is mapped into the guest (`--hints on`). Without it the I/O
    /// threads are still placed and their interrupts counted, but nothing is
    /// published.
    offered: std::sync::atomic::AtomicBool,
    /// M3 upcalls, when the guest is offered them: each new hint is also
    /// announced by a `HintUpdate` upcall.
    upcalls: std::sync::OnceLock<Upcaller>,
    /// Refused guest writes (`hints.rejected`).
    rejected: Tally<Rejected>,
}

crate::reasons! {
    /// Why the module refused a guest access (`hints.rejected`).
    pub Rejected {
        /// A store to the read-only hints page (an MMIO exit).
        PageWrite => "page_write",
    }
}

impl std::fmt::Debug for GuestHints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestHints({})", self.name)
    }
}

impl GuestHints {
    /// A hints page for a guest with `vcpus` (vCPU `i` has APIC id `i`, as
    /// `cpuid::filter` and the MADT give it).
    pub fn new(
        name: &str,
        vcpus: Vec<Arc<VcpuShared>>,
        io: Arc<IoPlacement>,
    ) -> Result<Self, HintsError> {
        let page = Page::new().map_err(HintsError::Map)?;
        page.hints().init();
        Ok(Self {
            name: name.to_owned(),
            page,
            vcpus,
            queues: Mutex::default(),
            io,
            offered: std::sync::atomic::AtomicBool::new(false),
            upcalls: std::sync::OnceLock::new(),
            rejected: Tally::default(),
        })
    }

    /// Announces every later hint with an M3 `HintUpdate` upcall too.
    pub fn set_upcaller(&self, upcalls: Upcaller) {
        let _ = self.upcalls.set(upcalls);
    }

    /// Maps the page into `vm`, read-only (KVM api.rst §4.35 `KVM_MEM_READONLY`):
    /// the host is the records' only writer.
    pub fn register(&self, vm: &VmFd) -> Result<(), HintsError> {
        let desc = kvm_userspace_memory_region {
            slot: slot::HINTS,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: area::HINTS,
            memory_size: PAGE_BYTES as u64,
            userspace_addr: self.page.mem.as_ptr() as u64,
        };
        // SAFETY: the host range is `self.page`, which the guest keeps alive for as
        // long as its VM fd.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| HintsError::Slot {
            slot: slot::HINTS,
            source,
        })?;
        self.offered.store(true, Ordering::Release);
        Ok(())
    }

    /// The CPUID offer telling the guest where the page is.
    #[must_use]
    pub fn cpuid_offer() -> Offer {
        Offer {
            feature: features::HINTS,
            leaf: LEAF_HINTS,
            regs: area_registers(area::HINTS, PAGE_BYTES as u32, para_abi::hints::VERSION),
        }
    }

    /// The hinter for queue `queue` of PCI device `device`, to be owned by the
    /// queue's I/O thread. `None` when the page is full.
    pub fn queue(self: &Arc<Self>, device: u8, queue: u16) -> Option<QueueHinter> {
        let k = key(device, queue);
        let mut qs = lock(&self.queues);
        let record = match qs
            .iter()
            .position(|q| q.device == device && q.queue == queue)
        {
            Some(i) => i,
            None if qs.len() < CAPACITY => {
                qs.push(Arc::new(QueueStats {
                    device,
                    queue,
                    sent: AtomicU64::new(0),
                    honoured: AtomicU64::new(0),
                    deferred: AtomicU64::new(0),
                    announced: AtomicU64::new(0),
                    irqs_by_apic: (0..self.vcpus.len()).map(|_| AtomicU64::new(0)).collect(),
                    irqs_colocated: AtomicU64::new(0),
                    last: Mutex::new(None),
                }));
                qs.len() - 1
            }
            None => {
                crate::guest_log!(warn, guest = %self.name, device, queue, "hints page full; queue gets no hints");
                return None;
            }
        };
        Some(QueueHinter {
            guest: self.clone(),
            stats: qs[record].clone(),
            record,
            key: k,
            last: None,
            last_sent: None,
            generation: 0,
            honoured_generation: 0,
            applied_io_cpu: None,
        })
    }

    /// The vCPUs (as APIC ids) that last entered the guest on host CPU `cpu`.
    fn vcpus_on(&self, cpu: i32) -> ApicSet {
        let mut s = ApicSet::default();
        for v in &self.vcpus {
            if v.host_cpu.load(Ordering::Relaxed) == cpu {
                s.insert(v.index);
            }
        }
        s
    }

    #[must_use]
    pub fn report(&self) -> HintsReport {
        let qs = lock(&self.queues);
        let queues: Vec<QueueReport> = qs
            .iter()
            .map(|q| {
                let last = lock(&q.last).clone();
                QueueReport {
                    device: q.device,
                    queue: q.queue,
                    hints_sent: q.sent.load(Ordering::Relaxed),
                    hints_honoured: q.honoured.load(Ordering::Relaxed),
                    hints_deferred: q.deferred.load(Ordering::Relaxed),
                    hints_announced: q.announced.load(Ordering::Relaxed),
                    irqs_by_vcpu: q
                        .irqs_by_apic
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .collect(),
                    irqs_colocated: q.irqs_colocated.load(Ordering::Relaxed),
                    last_host_cpu: last.as_ref().map(|l| l.0),
                    last_vcpus: last.map(|l| l.1).unwrap_or_default(),
                }
            })
            .collect();
        HintsReport {
            offered: self.offered.load(Ordering::Relaxed),
            hints_sent: queues.iter().map(|q| q.hints_sent).sum(),
            hints_honoured: queues.iter().map(|q| q.hints_honoured).sum(),
            io_cpu: self.io.wanted().and_then(|c| i32::try_from(c).ok()),
            io_moves: self.io.moves.load(Ordering::Relaxed),
            queues,
            rejected: self.rejected.snapshot(),
        }
    }
}

/// Per-queue hint state, owned by the queue's I/O thread.
pub struct QueueHinter {
    guest: Arc<GuestHints>,
    stats: Arc<QueueStats>,
    record: usize,
    key: u32,
    /// What the record says now: host CPU and vCPU set.
    last: Option<(i32, ApicSet)>,
    last_sent: Option<Instant>,
    generation: u32,
    honoured_generation: u32,
    applied_io_cpu: Option<usize>,
}

impl QueueHinter {
    /// Moves the calling (I/O) thread where [`IoPlacement`] says, if that changed.
    pub fn follow_placement(&mut self) {
        let want = self.guest.io.wanted();
        if want == self.applied_io_cpu {
            return;
        }
        self.applied_io_cpu = want;
        if let Some(cpu) = want {
            match pin_current_thread(cpu) {
                Ok(()) => {
                    self.guest.io.moves.fetch_add(1, Ordering::Relaxed);
                    info!(guest = %self.guest.name, cpu, "I/O thread pinned");
                }
                Err(e) => warn!(guest = %self.guest.name, cpu, "pinning the I/O thread: {e}"),
            }
        }
    }

    /// Called on the I/O thread just before it raises the queue's MSI whose
    /// current destination APIC id is `dest`: publishes a hint when this is the
    /// queue's first event or the vCPUs on this host CPU changed, and counts.
    pub fn before_interrupt(&mut self, dest: Option<u32>) {
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        let here = self.guest.vcpus_on(cpu);
        let now = Instant::now();
        let changed = self.last != Some((cpu, here));
        if changed && self.guest.offered.load(Ordering::Acquire) {
            let due = self
                .last_sent
                .is_none_or(|t| now.duration_since(t) >= MIN_HINT_INTERVAL);
            if due {
                self.publish(cpu, here, now);
                self.announce(dest);
            } else {
                self.stats.deferred.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.guest.io.count_irq();
        if let Some(d) = dest {
            if let Some(c) = self.stats.irqs_by_apic.get(d as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            if here.contains(d) {
                self.stats.irqs_colocated.fetch_add(1, Ordering::Relaxed);
            }
            let hinted = self.last.is_some_and(|(_, s)| s.contains(d));
            if hinted && self.honoured_generation != self.generation {
                self.honoured_generation = self.generation;
                self.stats.honoured.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Tells the guest about the new hint with a `HintUpdate` upcall (M3) to the
    /// vCPU that takes this queue's interrupt (`dest`), or the lowest vCPU that
    /// takes upcalls. Without upcalls the guest still sees the hint at its next
    /// interrupt from this queue.
    fn announce(&self, dest: Option<u32>) {
        if let Some(u) = self.guest.upcalls.get()
            && u(dest, UpcallClass::HintUpdate).is_some()
        {
            self.stats.announced.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn publish(&mut self, cpu: i32, here: ApicSet, now: Instant) {
        let hints = self.guest.page.hints();
        self.generation =
            hints.records[self.record].publish(self.key, u32::try_from(cpu).unwrap_or(0), &here);
        self.last = Some((cpu, here));
        self.last_sent = Some(now);
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<u32> = here.iter().collect();
        info!(
            guest = %self.guest.name,
            queue = self.stats.queue,
            host_cpu = cpu,
            vcpus = ?ids,
            generation = self.generation,
            "interrupt hint"
        );
        *lock(&self.stats.last) = Some((cpu, ids));
    }
}

/// After `after`, asks every guest's I/O thread to move to `cpu` (a run-time move
/// for tests and the benchmark).
pub fn schedule_move(placements: Vec<Arc<IoPlacement>>, after: Duration, cpu: usize) {
    let _ = std::thread::Builder::new()
        .name("io-mover".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::Kind::Helper);
            std::thread::sleep(after);
            info!(cpu, "moving the I/O threads");
            for p in placements {
                p.move_to(cpu);
            }
        });
}

/// The hints of one device, whose PCI device number is known once it is on the bus.
#[derive(Debug)]
pub struct DeviceHints {
    pub guest: Arc<GuestHints>,
    pub device: std::sync::OnceLock<u8>,
}

impl DeviceHints {
    #[must_use]
    pub fn new(guest: Arc<GuestHints>) -> Arc<Self> {
        Arc::new(Self {
            guest,
            device: std::sync::OnceLock::new(),
        })
    }

    /// The hinter of `queue`, once the device number is set.
    #[must_use]
    pub fn queue(&self, queue: u16) -> Option<QueueHinter> {
        self.guest.queue(*self.device.get()?, queue)
    }
}

impl Mechanism for GuestHints {
    fn name(&self) -> &'static str {
        "hints"
    }

    /// Offered only once the page is mapped (`--hints on`); without it the
    /// I/O threads are still placed and their interrupts counted.
    fn offer(&self) -> Option<Offer> {
        self.offered.load(Ordering::Acquire).then(Self::cpuid_offer)
    }

    fn mmio(self: Arc<Self>) -> Option<Arc<dyn MmioDevice>> {
        Some(Arc::new(HintsPageMmio(self)))
    }

    fn report(&self, r: &mut GuestReport) {
        r.hints = Some(GuestHints::report(self));
    }
}

/// Exiting guest stores to the read-only hints page: refused and counted
/// under their own reason, not as accesses to nothing.
pub struct HintsPageMmio(pub Arc<GuestHints>);

impl MmioDevice for HintsPageMmio {
    fn mmio_read(&self, _addr: u64, _data: &mut [u8]) -> bool {
        false // the page is readable memory; reads never exit
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let offered = self.0.offered.load(Ordering::Acquire);
        if !offered || !(area::HINTS..area::HINTS + PAGE_BYTES as u64).contains(&addr) {
            return false;
        }
        self.0.rejected.reject(
            Rejected::PageWrite,
            &self.0.name,
            "hints",
            format_args!("write of {} bytes at {addr:#x}", data.len()),
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use para_abi::hints::split_key;

    #[test]
    fn writes_to_the_read_only_page_have_their_own_reason() {
        let g = guest(&[0]);
        let dev = HintsPageMmio(g.clone());
        g.offered.store(false, Ordering::Release);
        assert!(!dev.mmio_write(area::HINTS, &[1]), "not offered: not ours");
        g.offered.store(true, Ordering::Release);
        assert!(dev.mmio_write(area::HINTS + 8, &[1, 2, 3, 4]));
        assert!(!dev.mmio_write(area::HINTS + PAGE_BYTES as u64, &[1]));
        let mut d = [0u8; 4];
        assert!(!dev.mmio_read(area::HINTS, &mut d));
        assert_eq!(g.report().rejected.get("page_write"), Some(&1));
    }

    fn guest(host_cpus: &[i32]) -> Arc<GuestHints> {
        let vcpus = host_cpus
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let v = VcpuShared::new(i as u32);
                v.host_cpu.store(c, Ordering::Relaxed);
                Arc::new(v)
            })
            .collect();
        let g = GuestHints::new("t", vcpus, Arc::new(IoPlacement::new(None))).unwrap();
        g.offered.store(true, Ordering::Relaxed);
        Arc::new(g)
    }

    #[test]
    fn without_the_offer_nothing_is_published_but_interrupts_are_counted() {
        let g = guest(&[here()]);
        g.offered.store(false, Ordering::Relaxed);
        let mut h = g.queue(1, 0).unwrap();
        h.before_interrupt(Some(0));
        assert_eq!(
            g.page.hints().records[0].read(),
            Err(para_abi::hints::ReadError::Empty)
        );
        let r = g.report();
        assert!(!r.offered);
        assert_eq!(
            (r.hints_sent, r.queues[0].irqs_by_vcpu.clone()),
            (0, vec![1])
        );
    }

    fn here() -> i32 {
        // SAFETY: no preconditions.
        unsafe { libc::sched_getcpu() }
    }

    #[test]
    fn first_event_publishes_the_vcpus_on_this_cpu_and_repeats_do_not() {
        let cpu = here();
        let g = guest(&[cpu + 1, cpu]);
        let mut h = g.queue(3, 0).unwrap();
        h.before_interrupt(Some(0));
        let rec = g.page.hints().records[0].read().unwrap();
        assert_eq!(split_key(rec.key), Some((3, 0)));
        // The test thread may migrate between sched_getcpu calls; only check when not.
        if here() == cpu {
            assert_eq!(rec.apics.iter().collect::<Vec<_>>(), vec![1]);
            h.before_interrupt(Some(0));
            h.before_interrupt(Some(1));
            let r = g.report();
            assert_eq!(r.hints_sent, 1);
            assert_eq!(
                r.hints_honoured, 1,
                "the interrupt to vCPU 1 honours the hint"
            );
            assert_eq!(r.queues[0].irqs_by_vcpu, vec![2, 1]);
            assert_eq!(r.queues[0].irqs_colocated, 1);
            assert!(r.summary().contains("sent 1 honoured 1"), "{}", r.summary());
        }
    }

    #[test]
    fn a_mapping_change_publishes_again_but_not_faster_than_the_interval() {
        let cpu = here();
        let g = guest(&[cpu, -1]);
        let mut h = g.queue(3, 0).unwrap();
        h.before_interrupt(None);
        // vCPU 1 comes to this CPU too: a new set.
        g.vcpus[1].host_cpu.store(cpu, Ordering::Relaxed);
        h.before_interrupt(None);
        if here() != cpu {
            return;
        }
        assert_eq!(g.report().hints_sent, 1);
        assert_eq!(g.report().queues[0].hints_deferred, 1);
        std::thread::sleep(MIN_HINT_INTERVAL);
        h.before_interrupt(None);
        let rec = g.page.hints().records[0].read().unwrap();
        if here() == cpu {
            assert_eq!(g.report().hints_sent, 2);
            assert_eq!(rec.apics.iter().collect::<Vec<_>>(), vec![0, 1]);
            assert_eq!(rec.generation, 4);
        }
    }

    #[test]
    fn queues_get_their_own_records_until_the_page_is_full() {
        let g = guest(&[0]);
        let a = g.queue(1, 0).unwrap();
        let b = g.queue(1, 1).unwrap();
        let again = g.queue(1, 0).unwrap();
        assert_eq!((a.record, b.record, again.record), (0, 1, 0));
        for q in 2..CAPACITY as u16 {
            assert!(g.queue(2, q).is_some());
        }
        assert!(g.queue(9, 9).is_none());
    }

    #[test]
    fn destinations_beyond_the_guest_are_not_counted() {
        let g = guest(&[-1]);
        let mut h = g.queue(1, 0).unwrap();
        h.before_interrupt(Some(200));
        assert_eq!(g.report().queues[0].irqs_by_vcpu, vec![0]);
    }
}
