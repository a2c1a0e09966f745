//! The virtio-pci modern transport (virtio 1.2 §4.1): capabilities in config
//! space, one 64-bit memory BAR holding the common, ISR, device and notify
//! structures and the MSI-X table and PBA; queue notifications by ioeventfd.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_bindings::virtio_config;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::config::{COMMAND, COMMAND_MEMORY, ConfigSpace};
use super::msix::Msix;
use super::{PciDevice, le_value, put_le};

use crate::counters::Reject;
use crate::kvm::memory::GuestMem;

/// The virtio PCI vendor id and the modern device id base (virtio 1.2 §4.1.2.1).
pub const VIRTIO_VENDOR: u16 = 0x1AF4;
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// VIRTIO_F_VERSION_1 (virtio 1.2 §6) as a feature mask.
pub const F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
/// Device status bits (virtio 1.2 §2.1), one byte in the common configuration.
pub const S_ACKNOWLEDGE: u8 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const S_DRIVER: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER as u8;
pub const S_DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const S_FEATURES_OK: u8 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const S_FAILED: u8 = virtio_config::VIRTIO_CONFIG_S_FAILED as u8;
/// "No vector" (virtio 1.2 §4.1.4.3; the transport's constants are not in
/// `virtio-bindings`, which covers the device-independent headers only).
pub const NO_VECTOR: u16 = 0xFFFF;

/// BAR 0 layout.
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x3C;
pub const ISR: u64 = 0x1000;
pub const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x6000;

/// virtio_pci_cap cfg_type values (virtio 1.2 §4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;

/// What a device backend gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMem,
    pub queues: Vec<Queue>,
    /// Per queue: the eventfd the guest's notify writes signal.
    pub notify: Vec<EventFd>,
    /// Per queue: the eventfd the doorbell monitor signals for the same queue
    /// (M1); the same meaning as `notify`, counted apart.
    pub doorbell: Vec<EventFd>,
    /// Per queue: the MSI-X vector for used-buffer notifications.
    pub vectors: Vec<u16>,
    pub msix: Arc<Msix>,
    pub features: u64,
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Device type (virtio 1.2 §5): 1 = network.
    fn device_type(&self) -> u16;
    /// PCI class code for the function.
    fn class_code(&self) -> u32;
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Option<Reject>;
    /// Starts processing; the device owns the queues from now on.
    fn activate(&mut self, a: Activation) -> Result<(), String>;
    /// Stops processing and forgets the queues (status 0 written).
    fn reset(&mut self);
}

pub struct VirtioPci {
    name: String,
    config: ConfigSpace,
    msix_cap: u16,
    pub msix: Arc<Msix>,
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    vm: Option<Arc<VmFd>>,
    notify: Vec<EventFd>,
    doorbell: Vec<EventFd>,
    /// BAR address the ioeventfds are registered at.
    registered_bar: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    generation: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    active: bool,
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar, id, padding[2], offset, length.
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPci {
    /// Builds the function with its BAR at `bar_base` (BAR_SIZE-aligned).
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        msix: Arc<Msix>,
        mem: GuestMem,
        vm: Option<Arc<VmFd>>,
        bar_base: u64,
    ) -> std::io::Result<Self> {
        let ty = device.device_type();
        let mut config = ConfigSpace::new(
            VIRTIO_VENDOR,
            MODERN_DEVICE_BASE + ty,
            device.class_code(),
            1,
            (VIRTIO_VENDOR, ty),
        );
        config.set_bar64(0, bar_base, BAR_SIZE);
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]),
            &[],
        );
        config.add_capability(CAP_ID_VENDOR, &virtio_cap(CAP_ISR, ISR, 4, &[]), &[]);
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CAP_DEVICE, DEVICE, DEVICE_LEN, &[]),
            &[],
        );
        let nq = device.queue_max_sizes().len() as u64;
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(
                CAP_NOTIFY,
                NOTIFY,
                (nq * u64::from(NOTIFY_MULTIPLIER)).max(4),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        // The PCI configuration access capability is mandatory (virtio 1.2 §4.1.4.9); its
        // window is not implemented: accesses through it read zero and are counted.
        config.add_capability(CAP_ID_VENDOR, &virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]), &[]);
        let n = msix.len() as u16;
        let mut body = Vec::new();
        body.extend_from_slice(&(n - 1).to_le_bytes()); // table size - 1, disabled, unmasked
        body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(CAP_ID_MSIX, &body, &[0, 0xC0]);
        let max = device.queue_max_sizes();
        let queues = max
            .iter()
            .map(|&m| Queue::new(m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let notify = max
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let doorbell = max
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut me = Self {
            name: name.to_owned(),
            config,
            msix_cap,
            msix,
            device,
            mem,
            vm,
            notify,
            doorbell,
            registered_bar: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            generation: 0,
            queue_select: 0,
            queue_vectors: vec![NO_VECTOR; queues.len()],
            queues,
            config_vector: NO_VECTOR,
            active: false,
        };
        me.register_ioeventfds();
        Ok(me)
    }

    /// Clones of the notify eventfds (for counting notifications).
    #[must_use]
    pub fn notify_fds(&self) -> Vec<EventFd> {
        self.notify
            .iter()
            .filter_map(|e| e.try_clone().ok())
            .collect()
    }

    /// Clones of the per-queue doorbell eventfds (what the M1 monitor rings).
    #[must_use]
    pub fn doorbell_fds(&self) -> Vec<EventFd> {
        self.doorbell
            .iter()
            .filter_map(|e| e.try_clone().ok())
            .collect()
    }

    /// Binds each queue's notify address to its eventfd, so that notifications are
    /// handled in KVM without an exit to the shim (api.rst §4.59 KVM_IOEVENTFD).
    fn register_ioeventfds(&mut self) {
        let Some(vm) = self.vm.clone() else { return };
        let bar = self.config.bar64(0);
        if self.registered_bar == Some(bar) {
            return;
        }
        if let Some(old) = self.registered_bar.take() {
            for (i, e) in self.notify.iter().enumerate() {
                let _ = vm.unregister_ioevent(
                    e,
                    &IoEventAddress::Mmio(old + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER)),
                    NoDatamatch,
                );
            }
        }
        for (i, e) in self.notify.iter().enumerate() {
            let addr = bar + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Err(err) = vm.register_ioevent(e, &IoEventAddress::Mmio(addr), NoDatamatch) {
                crate::guest_log!(warn, dev = %self.name, "ioeventfd at {addr:#x}: {err}; notifications will exit");
            }
        }
        self.registered_bar = Some(bar);
    }

    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_vectors.iter_mut().for_each(|v| *v = NO_VECTOR);
        self.queues.iter_mut().for_each(QueueT::reset);
        // The MSI-X capability and table belong to the PCI function, not to the
        // virtio device: a virtio reset forgets which vector each queue uses
        // (above) but leaves the table and the enable bit as the driver set
        // them (virtio 1.2 §4.1.4.3, §4.1.5.1.2). Drivers program MSI-X before
        // the reset that starts initialisation.
    }

    fn set_status(&mut self, v: u8) -> Option<Reject> {
        if v == 0 {
            crate::guest_log!(info, dev = %self.name, "device reset by driver");
            self.reset();
            return None;
        }
        // Bits may only be added until reset (virtio 1.2 §2.1.2).
        if self.status & !v != 0 {
            return Some(Reject::VirtioBadRegister);
        }
        let new = v & !self.status;
        if new & S_FEATURES_OK != 0 {
            let ok = self.driver_features & !self.device.features() == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up (§3.1.1).
                self.status = v & !S_FEATURES_OK;
                return Some(Reject::VirtioBadRegister);
            }
        }
        self.status = v;
        if new & S_DRIVER_OK != 0 && !self.active {
            return self.activate();
        }
        None
    }

    fn activate(&mut self) -> Option<Reject> {
        if self.status & S_FEATURES_OK == 0 {
            self.status |= S_FAILED;
            return Some(Reject::VirtioBadRegister);
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                crate::guest_log!(warn, dev = %self.name, queue = i, "queue rings outside guest RAM or misaligned; device failed");
                self.status |= S_FAILED;
                return Some(Reject::VirtioBadQueue);
            }
        }
        let a = Activation {
            mem: self.mem.clone(),
            queues: if let Ok(q) = self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
            {
                q
            } else {
                self.status |= S_FAILED;
                return Some(Reject::VirtioBadQueue);
            },
            notify: self.notify_fds(),
            doorbell: self.doorbell_fds(),
            vectors: self.queue_vectors.clone(),
            msix: self.msix.clone(),
            features: self.driver_features,
        };
        match self.device.activate(a) {
            Ok(()) => {
                self.active = true;
                crate::guest_log!(info, dev = %self.name, features = format_args!("{:#x}", self.driver_features), "device activated");
                None
            }
            Err(e) => {
                crate::guest_log!(warn, dev = %self.name, "activation failed: {e}");
                self.status |= S_FAILED;
                Some(Reject::VirtioBadQueue)
            }
        }
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) -> Option<Reject> {
        let qs = self.queue_select as usize;
        let q = self.queues.get(qs);
        let v: u64 = match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xFFFF_FFFF,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0C => match self.driver_feature_select {
                0 => self.driver_features & 0xFFFF_FFFF,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size())),
            0x1A => self
                .queue_vectors
                .get(qs)
                .map_or(u64::from(NO_VECTOR), |&v| u64::from(v)),
            0x1C => q.map_or(0, |q| u64::from(q.ready())),
            0x1E => q.map_or(0, |_| qs as u64), // queue_notify_off = index
            0x20 => q.map_or(0, QueueT::desc_table),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, QueueT::avail_ring),
            0x2C => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, QueueT::used_ring),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            0x38 | 0x3A => 0,
            _ => {
                put_le(data, 0);
                return Some(Reject::VirtioBadRegister);
            }
        };
        put_le(data, v);
        None
    }

    fn common_write(&mut self, off: u64, data: &[u8]) -> Option<Reject> {
        let v = le_value(data);
        let qs = self.queue_select as usize;
        // Queue registers freeze once the queue is enabled or the device is live (§4.1.4.3.2).
        let queue_locked = self.active || self.queues.get(qs).is_none_or(QueueT::ready);
        match off {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0C => {
                if self.status & S_FEATURES_OK != 0 {
                    return Some(Reject::VirtioBadRegister);
                }
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xFFFF_FFFF) | (v & 0xFFFF_FFFF);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xFFFF_FFFF) | ((v & 0xFFFF_FFFF) << 32);
                    }
                    _ => return Some(Reject::VirtioBadRegister),
                }
            }
            0x10 => self.config_vector = self.checked_vector(v as u16),
            0x14 => return self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if !queue_locked => {
                let max = self.queues[qs].max_size();
                let size = v as u16;
                if size == 0 || size > max || !size.is_power_of_two() {
                    return Some(Reject::VirtioBadQueue);
                }
                self.queues[qs].set_size(size);
            }
            0x1A if self.queues.get(qs).is_some() => {
                let vec = v as u16;
                self.queue_vectors[qs] = if vec == NO_VECTOR || (vec as usize) < self.msix.len() {
                    vec
                } else {
                    NO_VECTOR
                };
            }
            0x1C if !queue_locked => {
                if v != 1 {
                    return Some(Reject::VirtioBadQueue);
                }
                self.queues[qs].set_ready(true);
            }
            0x20 | 0x24 | 0x28 | 0x2C | 0x30 | 0x34 if !queue_locked => {
                let q = &mut self.queues[qs];
                let (lo, hi) = if off.is_multiple_of(8) {
                    (
                        Some(v as u32),
                        (data.len() == 8).then_some((v >> 32) as u32),
                    )
                } else {
                    (None, Some(v as u32))
                };
                match off & !7 {
                    0x20 => q.set_desc_table_address(lo, hi),
                    0x28 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => return Some(Reject::VirtioBadRegister),
        }
        None
    }

    /// A vector number the driver may use: one of ours, or NO_VECTOR.
    fn checked_vector(&self, v: u16) -> u16 {
        if v == NO_VECTOR || (v as usize) < self.msix.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn msix_control_changed(&self) {
        self.msix.set_control(self.config.read16(self.msix_cap + 2));
    }
}

/// True when an access of `len` bytes at offset `off` of the common
/// configuration names exactly one field at its own width (virtio 1.2
/// §4.1.3.1: the driver accesses each field with its width; a 64-bit queue
/// address may also be written as two 32-bit halves). Anything else would
/// read or write parts of several fields.
#[must_use]
pub fn common_access_ok(off: u64, len: usize) -> bool {
    match off {
        0x00 | 0x04 | 0x08 | 0x0C | 0x24 | 0x2C | 0x34 => len == 4,
        0x10 | 0x12 | 0x16 | 0x18 | 0x1A | 0x1C | 0x1E | 0x38 | 0x3A => len == 2,
        0x14 | 0x15 => len == 1,
        0x20 | 0x28 | 0x30 => len == 4 || len == 8,
        _ => false,
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let _ = self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<Reject> {
        let r = self.config.write(offset, data);
        let end = offset + data.len() as u16;
        if offset <= self.msix_cap + 3 && end > self.msix_cap + 2 {
            self.msix_control_changed();
        }
        if offset <= COMMAND + 1
            && end > COMMAND
            && self.config.read16(COMMAND) & COMMAND_MEMORY != 0
        {
            // Memory decoding (re)enabled: follow a BAR the guest may have moved.
            self.register_ioeventfds();
        }
        r
    }

    fn bars(&self) -> Vec<(u64, u64)> {
        vec![(self.config.bar64(0), BAR_SIZE)]
    }

    fn bar_read(&mut self, _bar: usize, off: u64, data: &mut [u8]) -> Option<Reject> {
        let len = data.len() as u64;
        match off {
            o if o + len <= COMMON + COMMON_LEN => {
                if !common_access_ok(o - COMMON, data.len()) {
                    data.fill(0xFF);
                    return Some(Reject::VirtioBadRegister);
                }
                self.common_read(o - COMMON, data)
            }
            o if (ISR..ISR + 4).contains(&o) => {
                // MSI-X is in use: the ISR carries nothing; reading it clears it (§4.1.4.5).
                put_le(data, 0);
                None
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) && o + len <= DEVICE + DEVICE_LEN => {
                self.device.read_config(o - DEVICE, data);
                None
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size()).contains(&o) => {
                self.msix.table_read(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_size()).contains(&o) => {
                self.msix.pba_read(o - MSIX_PBA, data)
            }
            _ => {
                data.fill(0xFF);
                Some(Reject::VirtioBadRegister)
            }
        }
    }

    fn bar_write(&mut self, _bar: usize, off: u64, data: &[u8]) -> Option<Reject> {
        let len = data.len() as u64;
        match off {
            o if o + len <= COMMON + COMMON_LEN => {
                if !common_access_ok(o - COMMON, data.len()) {
                    return Some(Reject::VirtioBadRegister);
                }
                self.common_write(o - COMMON, data)
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) && o + len <= DEVICE + DEVICE_LEN => {
                self.device.write_config(o - DEVICE, data)
            }
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => {
                // Reaches us only when no ioeventfd caught it: forward to the queue's eventfd.
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                match self.notify.get(q) {
                    Some(e) if (o - NOTIFY).is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) => {
                        let _ = e.write(1);
                        None
                    }
                    _ => Some(Reject::VirtioBadRegister),
                }
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size()).contains(&o) => {
                self.msix.table_write(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_size()).contains(&o) => {
                self.msix.pba_write(o - MSIX_PBA, data)
            }
            _ => Some(Reject::VirtioBadRegister),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::common_access_ok;

    #[test]
    fn common_configuration_takes_each_field_at_its_width_only() {
        assert!(common_access_ok(0x14, 1), "device_status");
        assert!(common_access_ok(0x16, 2), "queue_select");
        assert!(common_access_ok(0x20, 8), "queue_desc");
        assert!(common_access_ok(0x20, 4) && common_access_ok(0x24, 4));
        // Wider than the field: it would touch the next one too.
        assert!(!common_access_ok(0x14, 8), "status + generation + ...");
        assert!(!common_access_ok(0x16, 4), "queue_select + queue_size");
        assert!(!common_access_ok(0x00, 8));
        // Narrower than the field, or inside it.
        assert!(!common_access_ok(0x16, 1));
        assert!(!common_access_ok(0x17, 1));
        assert!(!common_access_ok(0x15, 4));
        assert!(
            !common_access_ok(0x24, 8),
            "the upper half of queue_desc is 4 bytes"
        );
        assert!(!common_access_ok(0x3C, 1), "past the structure");
    }
}
