//! The virtio 1.2 modern PCI transport (§4.1) with per-queue MSI-X vectors.
//!
//! `virtio-drivers` (pinned) does the transport itself but knows nothing of
//! MSI-X. [`MsixPciTransport`] wraps its `PciTransport`: it finds the MSI-X
//! capability and the common configuration structure, programs one table
//! entry per queue from a [`VectorPlan`], and — inside the device's own
//! initialisation sequence, after reset and before DRIVER_OK — writes
//! `config_msix_vector` and each `queue_msix_vector` and reads them back
//! (§4.1.5.1.2: a device that cannot allocate a vector answers NO_VECTOR).
//!
//! Queue notification is done here too, as a single 16-bit store to the
//! queue's notify address cached at `queue_set` (virtio 1.2 §4.1.4.4). The
//! wrapped transport re-selects the queue and re-reads `queue_notify_off` on
//! every notification: two extra register accesses, each a full exit to the
//! VMM. This is also the seam where doorbells will replace notification.

use crate::msix::{self, ApicId, MsiMessage, MsixCapability, MsixError, MsixTable};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, PciRoot,
};
use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error as VirtioError, Hal, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// virtio 1.2 §4.1.5.1.2: "no vector".
pub const NO_VECTOR: u16 = 0xFFFF;

/// Offsets in `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3).
mod common {
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_MSIX_VECTOR: usize = 0x1A;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1E;
}

const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// PCI command register bit 10: INTx emulation disabled (we use MSI-X only).
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The guest identity-maps the low 4 GiB only (para_abi::layout).
const MAPPED_END: u64 = para_abi::layout::IDENTITY_MAP_END;

#[derive(Debug)]
pub enum TransportError {
    Virtio(VirtioPciError),
    Msix(MsixError),
    /// A structure we need lies in a BAR above what the guest maps.
    Unmapped {
        what: &'static str,
        address: u64,
    },
    /// The common configuration capability is missing or unreadable.
    NoCommonConfig,
    /// The notification capability is missing or unreadable.
    NoNotifyConfig,
    /// The plan names more queues than the MSI-X table has entries.
    TooFewVectors {
        needed: usize,
        table_size: u16,
    },
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => write!(f, "virtio-pci: {e}"),
            Self::Msix(e) => write!(f, "MSI-X: {e}"),
            Self::Unmapped { what, address } => write!(
                f,
                "{what} at {address:#x} is outside the guest's mapped 4 GiB"
            ),
            Self::NoCommonConfig => {
                write!(f, "virtio-pci: no usable common configuration capability")
            }
            Self::NoNotifyConfig => write!(f, "virtio-pci: no usable notification capability"),
            Self::TooFewVectors { needed, table_size } => {
                write!(
                    f,
                    "device offers {table_size} MSI-X vectors, {needed} needed"
                )
            }
        }
    }
}

impl From<MsixError> for TransportError {
    fn from(e: MsixError) -> Self {
        Self::Msix(e)
    }
}

/// Where each queue's interrupt goes: entry `q + 1` of the table serves queue
/// `q`; entry 0 serves configuration changes when `config` is set.
#[derive(Clone, Debug)]
pub struct VectorPlan {
    pub config: Option<MsiMessage>,
    pub queues: Vec<MsiMessage>,
}

/// How the device took the vectors written during initialisation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VectorStatus {
    /// Queue vectors written and read back intact.
    pub accepted: u16,
    /// Vectors the device answered with NO_VECTOR (or another value) for.
    pub rejected: u16,
    pub config_accepted: bool,
}

/// Written by the transport during the driver's initialisation, read through
/// [`MsixControl::vector_status`].
#[derive(Debug, Default)]
struct SharedStatus {
    accepted: AtomicU16,
    rejected: AtomicU16,
    config_accepted: AtomicBool,
}

fn bar_address<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    df: DeviceFunction,
    bar: u8,
) -> Option<u64> {
    match root.bar_info(df, bar).ok()? {
        Some(BarInfo::Memory { address, .. }) if address != 0 => Some(address),
        _ => None,
    }
}

fn find_msix<C: ConfigurationAccess>(
    root: &PciRoot<C>,
    cfg: &C,
    df: DeviceFunction,
) -> Option<MsixCapability> {
    let cap = root.capabilities(df).find(|c| c.id == msix::CAP_ID)?;
    let table = cfg.read_word(df, cap.offset + 4);
    let pba = cfg.read_word(df, cap.offset + 8);
    Some(MsixCapability::decode(
        cap.offset,
        cap.private_header,
        table,
        pba,
    ))
}

/// A virtio vendor capability of type `cfg_type`: (its offset in config
/// space, the address of its structure, the structure's length).
fn find_virtio_cap<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    cfg: &C,
    df: DeviceFunction,
    cfg_type: u8,
) -> Option<(u8, u64, u32)> {
    let cap = root
        .capabilities(df)
        .find(|c| c.id == PCI_CAP_ID_VNDR && (c.private_header >> 8) as u8 == cfg_type)?;
    // struct virtio_pci_cap: bar at +4, offset at +8, length at +12 (virtio 1.2 §4.1.4).
    let bar = cfg.read_word(df, cap.offset + 4) as u8;
    let offset = cfg.read_word(df, cap.offset + 8);
    let length = cfg.read_word(df, cap.offset + 12);
    let base = bar_address(root, df, bar)?;
    Some((cap.offset, base + u64::from(offset), length))
}

/// Where queue notifications go: the notify structure and its multiplier.
#[derive(Clone, Copy, Debug)]
struct NotifyRegion {
    base: u64,
    length: u32,
    multiplier: u32,
}

/// Another way to tell the device about new buffers: exitless doorbells
/// (mechanism M1). `notify` returns false when the caller must fall back to
/// the virtio notify register.
pub trait QueueNotifier: Send {
    fn notify(&self, device: u8, queue: u16) -> bool;
}

/// A virtio-pci device whose queues interrupt through MSI-X. Hand it to a
/// virtio-drivers device driver; keep the [`MsixControl`] returned beside it.
pub struct MsixPciTransport {
    inner: PciTransport,
    common: *mut u8,
    notify: NotifyRegion,
    /// Each queue's notify address once `queue_set` computed it (0: not yet).
    notify_addr: Vec<u64>,
    /// When set, notifications go here first (see [`QueueNotifier`]).
    notifier: Option<alloc::boxed::Box<dyn QueueNotifier>>,
    /// PCI device number: how doorbell events name this device.
    device_number: u8,
    queues: u16,
    config_vector: bool,
    status: Arc<SharedStatus>,
}

// SAFETY: the raw pointer is device MMIO owned by this transport alone.
unsafe impl Send for MsixPciTransport {}

impl fmt::Debug for MsixPciTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixPciTransport")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// The device's MSI-X table: where each queue's interrupt goes, changeable
/// at run time (the interrupt-vCPU hint mechanism uses this).
pub struct MsixControl {
    table: MsixTable,
    plan: VectorPlan,
    status: Arc<SharedStatus>,
}

impl fmt::Debug for MsixControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixControl")
            .field("table", &self.table)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl MsixControl {
    /// How the device took the vectors the driver's initialisation wrote.
    #[must_use]
    pub fn vector_status(&self) -> VectorStatus {
        VectorStatus {
            accepted: self.status.accepted.load(Ordering::Acquire),
            rejected: self.status.rejected.load(Ordering::Acquire),
            config_accepted: self.status.config_accepted.load(Ordering::Acquire),
        }
    }

    /// Masks (or unmasks) queue `queue`'s vector: while masked the device only
    /// sets the pending bit (PCI 3.0 §6.8.3.4), so no interrupt is taken; an
    /// unmask delivers what is pending.
    pub fn set_queue_masked(&mut self, queue: u16, masked: bool) -> Result<(), MsixError> {
        self.table.set_masked(queue + 1, masked)
    }

    /// Where queue `queue`'s interrupts go now (read from the table).
    pub fn queue_message(&self, queue: u16) -> Result<MsiMessage, MsixError> {
        self.table.message(queue + 1)
    }

    /// Sends queue `queue`'s interrupts to `dest` from now on. Safe against an
    /// interrupt arriving meanwhile: the entry is masked while it changes, so
    /// such an interrupt is held pending and sent to `dest` on unmask (see
    /// [`MsixTable::program`]).
    pub fn retarget(&mut self, queue: u16, dest: ApicId) -> Result<(), MsixError> {
        let size = self.table.size();
        let slot = self
            .plan
            .queues
            .get_mut(usize::from(queue))
            .ok_or(MsixError::NoSuchEntry {
                entry: queue + 1,
                table_size: size,
            })?;
        let msg = MsiMessage::fixed(dest, slot.vector())?;
        self.table.program(queue + 1, msg)?;
        *slot = msg;
        Ok(())
    }
}

impl MsixPciTransport {
    /// Takes over the virtio device at `df`, reached through `cfg`: enables
    /// memory decoding, bus mastering and MSI-X (INTx off), and programs the
    /// table from `plan`.
    pub fn new<H: Hal, C: ConfigurationAccess>(
        mut cfg: C,
        df: DeviceFunction,
        plan: VectorPlan,
    ) -> Result<(Self, MsixControl), TransportError> {
        // SAFETY: `root` and `cfg` reach the same configuration space; this
        // function is their only user and uses them one after the other.
        let mut root = PciRoot::new(unsafe { cfg.unsafe_clone() });
        let root = &mut root;
        let cap = find_msix(root, &cfg, df).ok_or(MsixError::NoCapability)?;
        let needed = plan.queues.len() + 1;
        if needed > usize::from(cap.table_size) {
            return Err(TransportError::TooFewVectors {
                needed,
                table_size: cap.table_size,
            });
        }
        let table_base = bar_address(root, df, cap.table_bar)
            .ok_or(MsixError::BadTableBar(cap.table_bar))?
            + u64::from(cap.table_offset);
        if table_base + u64::from(cap.table_size) * 16 > MAPPED_END {
            return Err(TransportError::Unmapped {
                what: "the MSI-X table",
                address: table_base,
            });
        }
        let (_, common, _) = find_virtio_cap(root, &cfg, df, VIRTIO_PCI_CAP_COMMON_CFG)
            .ok_or(TransportError::NoCommonConfig)?;
        if common + 0x40 > MAPPED_END {
            return Err(TransportError::Unmapped {
                what: "the virtio common configuration",
                address: common,
            });
        }
        let (notify_cap, notify_base, notify_len) =
            find_virtio_cap(root, &cfg, df, VIRTIO_PCI_CAP_NOTIFY_CFG)
                .ok_or(TransportError::NoNotifyConfig)?;
        if notify_base + u64::from(notify_len) > MAPPED_END {
            return Err(TransportError::Unmapped {
                what: "the virtio notify structure",
                address: notify_base,
            });
        }
        // struct virtio_pci_notify_cap: notify_off_multiplier follows the common part (+16).
        let notify = NotifyRegion {
            base: notify_base,
            length: notify_len,
            multiplier: cfg.read_word(df, notify_cap + 16),
        };
        let (_, command) = root.get_status_command(df);
        root.set_command(
            df,
            command
                | Command::MEMORY_SPACE
                | Command::BUS_MASTER
                | Command::from_bits_retain(COMMAND_INTX_DISABLE),
        );
        let inner = PciTransport::new::<H, C>(root, df).map_err(TransportError::Virtio)?;
        // SAFETY: the table lies in an assigned memory BAR of this device,
        // inside the identity map (checked above), and only `MsixControl` writes it.
        let table = unsafe { MsixTable::new(table_base as *mut u32, cap.table_size) };
        for entry in 0..cap.table_size {
            table.set_masked(entry, true)?;
        }
        if let Some(msg) = plan.config {
            table.program(0, msg)?;
        }
        for (q, msg) in plan.queues.iter().enumerate() {
            table.program(q as u16 + 1, *msg)?;
        }
        // Message Control is the upper half of the capability's first dword.
        let first = cfg.read_word(df, cap.offset);
        let control = MsixCapability::enabled_control((first >> 16) as u16);
        cfg.write_word(
            df,
            cap.offset,
            (first & 0xFFFF) | (u32::from(control) << 16),
        );
        let status = Arc::new(SharedStatus::default());
        let transport = Self {
            inner,
            common: common as *mut u8,
            notify,
            notify_addr: alloc::vec![0; plan.queues.len().max(2)],
            notifier: None,
            device_number: df.device,
            queues: plan.queues.len() as u16,
            config_vector: plan.config.is_some(),
            status: status.clone(),
        };
        Ok((
            transport,
            MsixControl {
                table,
                plan,
                status,
            },
        ))
    }

    // The 16-bit fields sit at even offsets of a structure the spec aligns to 4
    // (virtio 1.2 §4.1.4: "offset … 4-byte aligned"), so the casts are aligned.
    #[allow(clippy::cast_ptr_alignment)]
    fn common_read16(&self, off: usize) -> u16 {
        // SAFETY: inside the common configuration structure (mapped, checked in `new`).
        unsafe { self.common.add(off).cast::<u16>().read_volatile() }
    }

    #[allow(clippy::cast_ptr_alignment)]
    fn common_write16(&self, off: usize, v: u16) {
        // SAFETY: as in `common_read16`.
        unsafe { self.common.add(off).cast::<u16>().write_volatile(v) }
    }

    /// Routes queue notifications through `notifier` (doorbells); the notify
    /// register stays the fallback.
    pub fn set_notifier(&mut self, notifier: alloc::boxed::Box<dyn QueueNotifier>) {
        self.notifier = Some(notifier);
    }

    /// The notify address of the selected queue (virtio 1.2 §4.1.4.4:
    /// `cap.offset + queue_notify_off * notify_off_multiplier`), if it lies
    /// inside the notify structure.
    fn selected_notify_addr(&self) -> Option<u64> {
        let off = u64::from(self.common_read16(common::QUEUE_NOTIFY_OFF))
            * u64::from(self.notify.multiplier);
        (off + 2 <= u64::from(self.notify.length)).then_some(self.notify.base + off)
    }

    /// Writes a vector register and reads it back (virtio 1.2 §4.1.5.1.2).
    fn set_vector(&self, reg: usize, entry: u16) -> bool {
        self.common_write16(reg, entry);
        self.common_read16(reg) == entry
    }
}

impl Transport for MsixPciTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features);
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        if let Some(n) = &self.notifier
            && n.notify(self.device_number, queue)
        {
            return;
        }
        match self.notify_addr.get(usize::from(queue)) {
            // SAFETY: a notify address inside the device's notify structure,
            // mapped (checked in `new`); virtio 1.2 §4.1.5.2: the driver writes
            // the queue index there, 16 bits.
            Some(&addr) if addr != 0 => unsafe {
                core::ptr::write_volatile(addr as *mut u16, queue);
            },
            _ => self.inner.notify(queue),
        }
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status);
        if status.is_empty() {
            // A reset forgets every vector (virtio 1.2 §4.1.4.3): program them afresh.
            self.status.accepted.store(0, Ordering::Release);
            self.status.rejected.store(0, Ordering::Release);
            let entry = if self.config_vector { 0 } else { NO_VECTOR };
            self.status.config_accepted.store(
                self.set_vector(common::CONFIG_MSIX_VECTOR, entry),
                Ordering::Release,
            );
        }
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size);
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area);
        // The inner transport left `queue` selected.
        let addr = self.selected_notify_addr();
        if let Some(slot) = self.notify_addr.get_mut(usize::from(queue)) {
            *slot = addr.unwrap_or(0);
        }
        if queue < self.queues {
            self.common_write16(common::QUEUE_SELECT, queue);
            let counter = if self.set_vector(common::QUEUE_MSIX_VECTOR, queue + 1) {
                &self.status.accepted
            } else {
                &self.status.rejected
            };
            counter.fetch_add(1, Ordering::AcqRel);
        }
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue);
        if let Some(slot) = self.notify_addr.get_mut(usize::from(queue)) {
            *slot = 0;
        }
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, VirtioError> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), VirtioError> {
        self.inner.write_config_space(offset, value)
    }
}
