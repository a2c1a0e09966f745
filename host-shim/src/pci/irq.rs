//! MSI routing: GSIs routed to MSI messages with KVM_SET_GSI_ROUTING, one irqfd per
//! GSI (api.rst §4.52 KVM_SET_GSI_ROUTING, §4.75 KVM_IRQFD).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use kvm_bindings::{KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// An MSI message (PCI 3.0 §6.8.1.3 address, §6.8.1.4 data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("out of GSIs")]
    NoGsi,
    #[error("KVM: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
}

/// What an interrupt source needs from the VM.
pub trait MsiRouter: Send + Sync {
    /// A fresh GSI with an irqfd bound to it.
    fn allocate(&self) -> Result<(u32, EventFd), IrqError>;
    /// Routes `gsi` to `msg`, or removes its route (`None`).
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError>;
}

/// The KVM implementation: the full routing table is resubmitted on each change.
pub struct KvmMsiRouter {
    vm: Arc<VmFd>,
    next_gsi: AtomicU32,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
}

/// The highest GSI we hand out (KVM_MAX_IRQ_ROUTES is 4096).
const MAX_GSI: u32 = 4095;

impl KvmMsiRouter {
    #[must_use]
    pub fn new(vm: Arc<VmFd>, first_gsi: u32) -> Self {
        Self {
            vm,
            next_gsi: AtomicU32::new(first_gsi),
            routes: Mutex::default(),
        }
    }
}

impl MsiRouter for KvmMsiRouter {
    fn allocate(&self) -> Result<(u32, EventFd), IrqError> {
        let gsi = self.next_gsi.fetch_add(1, Ordering::Relaxed);
        if gsi > MAX_GSI {
            return Err(IrqError::NoGsi);
        }
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
            IrqError::Kvm(kvm_ioctls::Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        })?;
        self.vm.register_irqfd(&fd, gsi)?;
        Ok((gsi, fd))
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        let mut routes = lock(&self.routes);
        match msg {
            Some(m) => routes.insert(gsi, m),
            None => routes.remove(&gsi),
        };
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .map(|(&gsi, m)| {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = m.address as u32;
                e.u.msi.address_hi = (m.address >> 32) as u32;
                e.u.msi.data = m.data;
                e
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::NoGsi)?;
        self.vm.set_gsi_routing(&table)?;
        Ok(())
    }
}
