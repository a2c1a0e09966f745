//! M5 VM queues, host half: each guest's VM-queue area (header, directory,
//! inbox, outbox, receive window; `para_abi::vmq`) as its own memslot, the
//! [`manager::Manager`] that moves messages, and the exit hook that delivers.
//!
//! Delivery points: every exit of the sender's vCPUs runs [`VmqHook`], which
//! drains the outbox when it is non-empty. The immediate policy makes that exit
//! itself (`VmqFlush` hypercall); the lazy policy waits for whatever exit comes.

pub mod manager;
pub mod pages;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use kvm_bindings::{kvm_msi, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use para_abi::discovery::{LEAF_VMQ, area_registers, features};
use para_abi::layout::{LAPIC_BASE, area};
use para_abi::vmq;
use tracing::warn;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::cpuid::Offer;
use crate::memory::{self, GuestMem};
use crate::vcpu::{ExitHook, GuestCtx, VcpuShared};
use crate::vm::{Guest, VmError};
use manager::{EndpointMemory, Manager, Notify, VmqCounters};
use pages::Mapping;

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
    #[error(transparent)]
    Offer(#[from] VmError),
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
            warn!("VM-queue arrival MSI: {e}");
        }
    })
}

/// Notifies arrivals as an M3 `VmqArrival` upcall to vCPU 0 (the one the guest
/// waits on), injected when its interrupt window opens (issue 7: VM-queue
/// arrivals use this path by default). Falls back to the MSI while no vCPU
/// has enabled upcalls (early boot) or when the guest is ending.
fn upcall_notify(upcalls: Arc<crate::pending::GuestUpcalls>, fallback: Notify) -> Notify {
    Box::new(move || {
        if upcalls
            .post_to_guest(Some(0), crate::pending::UpcallClass::VmqArrival)
            .is_none()
        {
            fallback();
        }
    })
}

/// Delivers a guest's outbox at each exit of its vCPUs and notices its end.
pub struct VmqHook {
    pub manager: Arc<Manager>,
    pub id: u32,
    /// The guest's area, to peek at the outbox counters without the lock.
    area_base: usize,
    pub counters: Arc<VmqCounters>,
}

impl ExitHook for VmqHook {
    fn after_exit(&self, _fd: &VcpuFd, _vcpu: &VcpuShared, guest: &GuestCtx) {
        if guest.stop.load(std::sync::atomic::Ordering::Acquire) {
            self.manager.mark_exited(self.id);
            return;
        }
        if Manager::outbox_pending(self.area_base) {
            self.manager.drain(self.id);
        }
    }
}

/// Gives guest `g` a VM-queue area (memslot `VMQ_FIRST` at `area::VMQ`), offers
/// it (feature `VM_QUEUES`, leaf `LEAF_VMQ`) and joins it to `manager`.
pub fn attach(g: &mut Guest, manager: &Arc<Manager>) -> Result<Arc<VmqCounters>, AttachError> {
    let area = Area::new(&g.name)?;
    let desc = kvm_userspace_memory_region {
        slot: memory::slot::VMQ_FIRST,
        flags: 0,
        guest_phys_addr: area::VMQ,
        memory_size: vmq::AREA_SIZE,
        userspace_addr: area.base() as u64,
    };
    // SAFETY: the area's mapping is owned by the manager's endpoint (moved there
    // below) and lives as long as the manager, which the guest's exit hook keeps
    // alive for as long as the VM runs.
    unsafe { g.vm.set_user_memory_region(desc) }.map_err(AttachError::Slot)?;
    let base = area.base();
    let mem = endpoint_memory(&g.mem, area)?;
    let msi = msi_notify(g.vm.clone(), vmq::ARRIVAL_VECTOR);
    let notify = match g.upcalls.clone() {
        Some(u) => upcall_notify(u, msi),
        None => msi,
    };
    let (id, counters) = manager.add(&g.name, mem, notify)?;
    g.offer(Offer {
        feature: features::VM_QUEUES,
        leaf: LEAF_VMQ,
        regs: area_registers(area::VMQ, vmq::AREA_SIZE as u32, vmq::VERSION),
    })?;
    g.add_exit_hook(Arc::new(VmqHook {
        manager: manager.clone(),
        id,
        area_base: base,
        counters: counters.clone(),
    }));
    Ok(counters)
}

/// Every guest's VM-queue wiring for one shim run.
#[derive(Default)]
pub struct Setup {
    pub manager: Arc<Manager>,
    counters: Vec<Arc<VmqCounters>>,
    workers: Vec<DoorbellWorker>,
}

impl Setup {
    /// Attaches guest `g`; with `doorbells`, also returns the doorbell target
    /// for its outbox (the doorbell policy), for `GuestDoorbells`.
    pub fn attach(
        &mut self,
        g: &mut Guest,
        doorbells: bool,
    ) -> Result<Vec<crate::doorbell::Target>, AttachError> {
        self.counters.push(attach(g, &self.manager)?);
        if !doorbells {
            return Ok(Vec::new());
        }
        let (target, worker) =
            doorbell_target(&self.manager, self.counters.len() - 1).map_err(AttachError::Worker)?;
        self.workers.push(worker);
        Ok(vec![target])
    }

    /// Stops the doorbell workers and puts each guest's counters into its
    /// report. Ids are positions: every guest has VM queues or none does.
    pub fn finish(self, reports: &mut [crate::stats::GuestReport]) {
        drop(self.workers);
        for (i, (r, c)) in reports.iter_mut().zip(&self.counters).enumerate() {
            r.vmq = Some(c.report(i as u32));
        }
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
                // Each read returns after one or more writes (eventfd(2)).
                while waiter.read().is_ok() {
                    if stopping.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    manager.drain(id);
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

/// The doorbell target for guest `index`'s VM-queue outbox and the worker behind it.
pub fn doorbell_target(
    manager: &Arc<Manager>,
    index: usize,
) -> std::io::Result<(crate::doorbell::Target, DoorbellWorker)> {
    let id = u32::try_from(index).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let worker = DoorbellWorker::start(manager.clone(), id)?;
    let target = crate::doorbell::Target {
        device: para_abi::doorbell::device::VMQ,
        queues: vec![worker.fd.try_clone()?],
    };
    Ok((target, worker))
}
