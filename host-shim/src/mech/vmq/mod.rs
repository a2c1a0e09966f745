//! M5 VM queues, host half: each guest's VM-queue area (header, directory,
//! inbox, outbox, receive window; `para_abi::vmq`) as its own memslot, the
//! [`manager::Manager`] that moves messages, and [`Vmq`], M5 as a guest's
//! mechanism, whose exit hook delivers.
//!
//! Delivery points: every exit of the sender's vCPUs runs [`Vmq`]'s exit hook,
//! which drains the outbox when it is non-empty. The immediate policy makes that exit
//! itself (`VmqFlush` hypercall); the lazy policy waits for whatever exit comes.

pub mod manager;
pub mod pages;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use kvm_bindings::{kvm_msi, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use para_abi::discovery::{LEAF_VMQ, area_registers, features};
use para_abi::hypercall::{Call, Status};
use para_abi::layout::{LAPIC_BASE, area};
use para_abi::vmq;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::kvm::cpuid::Offer;
use crate::kvm::memory::{self, GuestMem};
use crate::loglimit::LogLimit;
use crate::mech::doorbell::Target;
use crate::mech::{CallCtx, ExitCtx, Mechanism, UpcallClass, Upcaller};
use crate::platform::MmioDevice;
use crate::report::GuestReport;
use manager::{EndpointMemory, Manager, Notify, Origin, VmqCounters};
use pages::Mapping;
use std::sync::atomic::Ordering;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("VM-queue area memory: {0}")]
    Memory(#[from] memory::MemoryError),
    #[error("VM-queue area: {0}")]
    Map(String),
    #[error("KVM_SET_USER_MEMORY_REGION for the VM-queue area: {0}")]
    Slot(kvm_ioctls::Error),
    #[error(transparent)]
    Manager(#[from] manager::VmqError),
    #[error("VM-queue doorbell worker: {0}")]
    Worker(std::io::Error),
}

/// A guest's VM-queue area, host side: a memfd mapping of `vmq::AREA_SIZE` bytes.
pub struct Area {
    pub region: MmapRegion,
    pub file: Arc<std::fs::File>,
}

impl Area {
    pub fn new(name: &str) -> Result<Self, AttachError> {
        let file = Arc::new(memory::memfd(&format!("{name}-vmq"), vmq::AREA_SIZE)?);
        let region = MmapRegion::from_file(
            FileOffset::from_arc(file.clone(), 0),
            vmq::AREA_SIZE as usize,
        )
        .map_err(|e| AttachError::Map(e.to_string()))?;
        Ok(Self { region, file })
    }

    #[must_use]
    pub fn base(&self) -> usize {
        self.region.as_ptr() as usize
    }
}

/// The manager's view of guest RAM `ram` and area `area`.
pub fn endpoint_memory(ram: &GuestMem, area: Area) -> Result<EndpointMemory, AttachError> {
    let region = ram
        .iter()
        .next()
        .ok_or_else(|| AttachError::Map("guest has no RAM".into()))?;
    let fo = region
        .file_offset()
        .ok_or_else(|| AttachError::Map("guest RAM is not file-backed".into()))?;
    let base = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .map_err(|e| AttachError::Map(e.to_string()))? as usize;
    if region.start_addr().0 != 0 {
        return Err(AttachError::Map("guest RAM must start at 0".into()));
    }
    Ok(EndpointMemory {
        ram: Mapping {
            base,
            len: region.len(),
            file: 0,
            offset: fo.start(),
        },
        area: Mapping {
            base: area.base(),
            len: vmq::AREA_SIZE,
            file: 0,
            offset: 0,
        },
        ram_file: fo.arc().clone(),
        area_file: area.file.clone(),
        keep: Box::new((ram.clone(), area)),
    })
}

/// Whether the host gives shared memory transparent huge pages when asked
/// (`shmem_enabled` `advise`, `within_size` or `always`); logged once.
fn huge_pages() -> bool {
    static MODE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let mode = pages::shmem_thp_mode();
        let on = matches!(
            mode.as_deref(),
            Some("advise" | "within_size" | "always" | "force")
        );
        if on {
            tracing::info!(
                "VM queues: shared-memory huge pages ({}): 2 MiB remaps fault once per 2 MiB",
                mode.as_deref().unwrap_or("?")
            );
        } else {
            tracing::info!(
                "VM queues: no shared-memory huge pages (shmem_enabled {}): remapped pages fault per 4 KiB; as root, `echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled` enables them",
                mode.as_deref().unwrap_or("unknown")
            );
        }
        on
    })
}

/// Sends `vector` as an MSI to APIC id 0 of `vm` (split irqchip: the in-kernel
/// LAPIC takes it; SDM vol 3 §11.11.1 address/data format, KVM api.rst
/// KVM_SIGNAL_MSI).
fn msi_notify(vm: Arc<VmFd>, vector: u8) -> Notify {
    Box::new(move || {
        let msi = kvm_msi {
            address_lo: LAPIC_BASE as u32,
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        if let Err(e) = vm.signal_msi(msi) {
            crate::guest_log!(warn, "VM-queue arrival MSI: {e}");
        }
    })
}

/// Notifies arrivals as an M3 `VmqArrival` upcall to vCPU 0 (the one the guest
/// waits on), injected when its interrupt window opens (VM-queue arrivals use
/// this path by default). Falls back to the MSI while no vCPU has enabled
/// upcalls (early boot) or when the guest is ending.
fn upcall_notify(upcall: Upcaller, fallback: Notify) -> Notify {
    Box::new(move || {
        if upcall(Some(0), UpcallClass::VmqArrival).is_none() {
            fallback();
        }
    })
}

/// How guest `vm` learns that something arrived for it: a `VmqArrival`
/// upcall where it takes upcalls, else the arrival MSI (vector
/// `vmq::ARRIVAL_VECTOR`). The guest's wait loops re-read what they wait on
/// after either, so any producer of "look again" may use it.
#[must_use]
pub fn arrival_notify(vm: &Arc<VmFd>, upcall: Option<Upcaller>) -> Notify {
    let msi = msi_notify(vm.clone(), vmq::ARRIVAL_VECTOR);
    match upcall {
        Some(u) => upcall_notify(u, msi),
        None => msi,
    }
}

/// M5 as a guest's mechanism: delivers the guest's outbox at each exit of its
/// vCPUs and notices its end.
pub struct Vmq {
    pub manager: Arc<Manager>,
    pub id: u32,
    /// The guest's area, to peek at the outbox counters without the lock.
    area_base: usize,
    pub counters: Arc<VmqCounters>,
}

/// `VmqFlush`: the exit is the point, the hook drains before the guest resumes.
const CALLS: &[Call] = &[Call::VmqFlush];

impl Vmq {
    /// Gives guest `name` (VM `vm`, RAM `ram`) a VM-queue area (memslot
    /// `VMQ_FIRST` at `area::VMQ`) and joins it to `manager`. Arrivals are
    /// announced through `upcall` when the guest has upcalls, else by MSI.
    pub fn new(
        name: &str,
        vm: &Arc<VmFd>,
        ram: &GuestMem,
        manager: &Arc<Manager>,
        upcall: Option<Upcaller>,
    ) -> Result<Self, AttachError> {
        let area = Area::new(name)?;
        let desc = kvm_userspace_memory_region {
            slot: memory::slot::VMQ_FIRST,
            flags: 0,
            guest_phys_addr: area::VMQ,
            memory_size: vmq::AREA_SIZE,
            userspace_addr: area.base() as u64,
        };
        // SAFETY: the area's mapping is owned by the manager's endpoint (moved there
        // below) and lives as long as the manager, which the guest's mechanism keeps
        // alive for as long as the VM runs.
        unsafe { vm.set_user_memory_region(desc) }.map_err(AttachError::Slot)?;
        let base = area.base();
        let mem = endpoint_memory(ram, area)?;
        if huge_pages() {
            for m in [&mem.ram, &mem.area] {
                if let Err(e) = pages::advise_huge(m.base, m.len) {
                    tracing::warn!(guest = name, "VM queues: MADV_HUGEPAGE: {e}");
                }
            }
            manager.use_huge_pages();
        }
        let (id, counters) = manager.add(name, mem, arrival_notify(vm, upcall))?;
        Ok(Self {
            manager: manager.clone(),
            id,
            area_base: base,
            counters,
        })
    }
}

impl Mechanism for Vmq {
    fn name(&self) -> &'static str {
        "vmq"
    }

    fn offer(&self) -> Option<Offer> {
        Some(Offer {
            feature: features::VM_QUEUES,
            leaf: LEAF_VMQ,
            regs: area_registers(area::VMQ, vmq::AREA_SIZE as u32, vmq::VERSION),
        })
    }

    fn calls(&self) -> &'static [Call] {
        CALLS
    }

    fn hypercall(&self, _cx: &CallCtx<'_>, _call: Call, _arg: u64) -> u64 {
        self.counters.flush_calls.fetch_add(1, Ordering::Relaxed);
        self.manager.drain_by(self.id, Origin::Flush);
        Status::Ok as u64
    }

    fn mmio(self: Arc<Self>) -> Option<Arc<dyn MmioDevice>> {
        Some(Arc::new(KickPage {
            manager: self.manager.clone(),
            id: self.id,
            counters: self.counters.clone(),
            log: LogLimit::default(),
        }))
    }

    fn ending(&self) {
        // A vCPU blocked in a kick-page wait is in no KVM_RUN a kick reaches.
        self.manager.mark_exited(self.id);
        self.manager.wake_all();
    }

    fn after_exit(&self, cx: &mut ExitCtx<'_>) -> bool {
        if cx.stopping {
            self.manager.mark_exited(self.id);
        } else if Manager::outbox_pending(self.area_base) {
            self.manager.drain(self.id);
        }
        false
    }

    fn report(&self, r: &mut GuestReport) {
        r.vmq = Some(self.counters.report(self.id));
    }
}

/// The kick page (`vmq::KICK`, no memory behind it): a guest store there is
/// an MMIO exit on the storing vCPU's thread. It delivers the guest's outbox
/// and, for a wait, blocks that thread until something arrives
/// ([`Manager::wait`]): the exit a guest about to idle makes in place of a
/// halt (which this KVM handles without the shim), so lazy messages leave
/// with it. Reads, and stores of another size, are refused and counted.
pub(crate) struct KickPage {
    pub(crate) manager: Arc<Manager>,
    pub(crate) id: u32,
    pub(crate) counters: Arc<VmqCounters>,
    pub(crate) log: LogLimit,
}

impl KickPage {
    fn refuse(&self, what: std::fmt::Arguments<'_>) {
        self.counters.bad_kicks.fetch_add(1, Ordering::Relaxed);
        crate::guest_log!(
            warn,
            limit = self.log,
            vmq_id = self.id,
            "VM-queue kick page: {what} refused"
        );
    }
}

impl MmioDevice for KickPage {
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if !kick_page(addr) {
            return false;
        }
        self.refuse(format_args!("read of {} bytes at {addr:#x}", data.len()));
        true
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if !kick_page(addr) {
            return false;
        }
        let q = self;
        let Ok(raw) = <[u8; 8]>::try_from(data) else {
            self.refuse(format_args!("write of {} bytes at {addr:#x}", data.len()));
            return true;
        };
        let k = vmq::Kick::decode(u64::from_le_bytes(raw));
        if k.wait {
            q.manager.wait(q.id, &k);
        } else {
            if k.full {
                &q.counters.full_flushes
            } else {
                &q.counters.kick_flushes
            }
            .fetch_add(1, Ordering::Relaxed);
            q.manager.drain_by(q.id, Origin::Flush);
        }
        true
    }
}

fn kick_page(addr: u64) -> bool {
    let page = area::VMQ + vmq::KICK;
    (page..page + vmq::KICK_SIZE).contains(&addr)
}

/// Every guest's VM-queue wiring for one shim run: one manager, and the
/// doorbell workers of the guests' outboxes.
#[derive(Default)]
pub struct Setup {
    pub manager: Arc<Manager>,
    workers: Vec<DoorbellWorker>,
}

impl Setup {
    /// Joins guest `name` to the run's manager; with `doorbells`, also returns
    /// the doorbell target for its outbox (the doorbell policy), for its
    /// doorbells.
    pub fn attach(
        &mut self,
        name: &str,
        vm: &Arc<VmFd>,
        ram: &GuestMem,
        upcall: Option<Upcaller>,
        doorbells: bool,
    ) -> Result<(Arc<Vmq>, Vec<Target>), AttachError> {
        let q = Arc::new(Vmq::new(name, vm, ram, &self.manager, upcall)?);
        if !doorbells {
            return Ok((q, Vec::new()));
        }
        let (target, worker) = doorbell_target(&self.manager, q.id).map_err(AttachError::Worker)?;
        self.workers.push(worker);
        Ok((q, vec![target]))
    }

    /// Stops the doorbell workers (once the guests have ended).
    pub fn finish(self) {
        drop(self.workers);
    }
}

/// The doorbell policy's host half: the guest's doorbell events for device
/// `para_abi::doorbell::device::VMQ` make the M1 monitor thread write this
/// eventfd (a `doorbell::Target`); a worker thread waits on it and drains the
/// guest's outbox. No vCPU exit is involved.
pub struct DoorbellWorker {
    pub fd: vmm_sys_util::eventfd::EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl DoorbellWorker {
    /// Starts the worker for manager id `id`.
    pub fn start(manager: Arc<Manager>, id: u32) -> std::io::Result<Self> {
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC)?;
        let waiter = fd.try_clone()?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vmq-doorbell-{id}"))
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Vmq);
                // Each read returns after one or more writes (eventfd(2)).
                while waiter.read().is_ok() {
                    if stopping.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    manager.drain_by(id, Origin::Worker);
                }
            })?;
        Ok(Self {
            fd,
            thread: Some(thread),
            stop,
        })
    }
}

impl Drop for DoorbellWorker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.fd.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The doorbell target for manager id `id`'s VM-queue outbox and the worker
/// behind it. The monitor that consumes the event drains the outbox itself
/// (run to completion, counted `delivered_at_monitor`); the worker takes
/// what the monitor hands on through the eventfd (an overflowed ring's
/// "device has work").
pub fn doorbell_target(
    manager: &Arc<Manager>,
    id: u32,
) -> std::io::Result<(Target, DoorbellWorker)> {
    let worker = DoorbellWorker::start(manager.clone(), id)?;
    let m = manager.clone();
    let target = Target {
        device: para_abi::doorbell::device::VMQ,
        queues: vec![worker.fd.try_clone()?],
        inline: Some(Arc::new(move |queue| {
            queue == 0 && {
                m.drain_by(id, Origin::Monitor);
                true
            }
        })),
    };
    Ok((target, worker))
}
