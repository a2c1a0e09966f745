//! A fake virtio-net device for host tests: the device side of the split
//! virtqueue (virtio 1.2 §2.7) over memory the driver allocated, so tests can
//! hand the driver exactly the frames and completions a hostile or broken
//! device would.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::vec::Vec;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Error, Hal, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Host memory stands in for guest memory: physical = virtual.
pub struct TestHal;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * 4096, 4096).expect("valid layout")
}

// SAFETY: allocations are zeroed, page-aligned and owned by the caller until
// `dma_dealloc`; addresses are host pointers used as "physical" addresses.
unsafe impl Hal for TestHal {
    fn dma_alloc(pages: usize, _: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: non-zero size layout.
        let p = unsafe { alloc_zeroed(layout(pages)) };
        let p = NonNull::new(p).expect("test allocation");
        (p.as_ptr() as u64, p)
    }
    unsafe fn dma_dealloc(_: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: allocated by `dma_alloc` with the same layout.
        unsafe { dealloc(vaddr.as_ptr(), layout(pages)) };
        0
    }
    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("non-null")
    }
    unsafe fn share(buffer: NonNull<[u8]>, _: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as u64
    }
    unsafe fn unshare(_: PhysAddr, _: NonNull<[u8]>, _: BufferDirection) {}
}

#[derive(Default, Clone, Copy)]
struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
}

#[derive(Default)]
pub struct State {
    status: DeviceStatus,
    queues: [Queue; 2],
    pub notifications: [u32; 2],
}

/// The transport half handed to the driver.
pub struct FakeNet {
    pub state: Arc<Mutex<State>>,
}

pub const MAC: [u8; 6] = [0x52, 0x54, 0, 0xAB, 0xCD, 0xEF];
const VERSION_1: u64 = 1 << 32;
const FEATURE_MAC: u64 = 1 << 5;
/// virtio 1.2 §5.1.6: the header with VERSION_1.
pub const NET_HDR_LEN: usize = 12;

impl FakeNet {
    #[must_use]
    pub fn new() -> (Self, Device) {
        let state = Arc::new(Mutex::new(State::default()));
        (
            Self {
                state: state.clone(),
            },
            Device { state },
        )
    }
}

impl Transport for FakeNet {
    fn device_type(&self) -> DeviceType {
        DeviceType::Network
    }
    fn read_device_features(&mut self) -> u64 {
        VERSION_1 | FEATURE_MAC
    }
    fn write_driver_features(&mut self, _: u64) {}
    fn max_queue_size(&mut self, _: u16) -> u32 {
        256
    }
    fn notify(&mut self, queue: u16) {
        self.state.lock().unwrap().notifications[usize::from(queue)] += 1;
    }
    fn get_status(&self) -> DeviceStatus {
        self.state.lock().unwrap().status
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.state.lock().unwrap().status = status;
    }
    fn set_guest_page_size(&mut self, _: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        desc: PhysAddr,
        avail: PhysAddr,
        used: PhysAddr,
    ) {
        self.state.lock().unwrap().queues[usize::from(queue)] = Queue {
            size: size as u16,
            desc,
            avail,
            used,
            last_avail: 0,
        };
    }
    fn queue_unset(&mut self, queue: u16) {
        self.state.lock().unwrap().queues[usize::from(queue)] = Queue::default();
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.state.lock().unwrap().queues[usize::from(queue)].desc != 0
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        0
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&MAC);
        config[6] = 1; // status: link up
        let bytes = config.get(offset..).ok_or(Error::ConfigSpaceTooSmall)?;
        T::read_from_prefix(bytes)
            .map(|(t, _)| t)
            .map_err(|_| Error::ConfigSpaceTooSmall)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _: usize,
        _: T,
    ) -> Result<(), Error> {
        Err(Error::Unsupported)
    }
}

/// The device half the test drives.
pub struct Device {
    state: Arc<Mutex<State>>,
}

/// # Safety
/// `addr` must come from the driver's own `queue_set` or descriptors (memory
/// from `TestHal` or the driver's heap, live while the driver exists).
unsafe fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: per the function's contract.
    unsafe { std::ptr::read_volatile(addr as *const T) }
}

/// # Safety
/// As [`rd`], and the location must be one the device side may write.
unsafe fn wr<T>(addr: u64, v: T) {
    // SAFETY: per the function's contract.
    unsafe { std::ptr::write_volatile(addr as *mut T, v) }
}

impl Device {
    /// Takes the next buffer the driver made available on `queue`:
    /// (head descriptor id, buffer address, buffer length).
    fn pop_avail(&self, queue: usize) -> Option<(u16, u64, u32)> {
        let mut st = self.state.lock().unwrap();
        let q = &mut st.queues[queue];
        // avail ring: flags u16, idx u16, ring[size] u16.
        // SAFETY: inside the avail ring the driver registered.
        let idx: u16 = unsafe { rd(q.avail + 2) };
        if idx == q.last_avail {
            return None;
        }
        // SAFETY: inside the avail ring the driver registered.
        let head: u16 = unsafe { rd(q.avail + 4 + 2 * u64::from(q.last_avail % q.size)) };
        q.last_avail = q.last_avail.wrapping_add(1);
        // Descriptor: addr u64, len u32, flags u16, next u16.
        let d = q.desc + 16 * u64::from(head);
        // SAFETY: inside the descriptor table the driver registered.
        let (addr, len) = unsafe { (rd(d), rd(d + 8)) };
        Some((head, addr, len))
    }

    /// Appends `(id, len)` to `queue`'s used ring and publishes it. Any id and
    /// length: a hostile or broken device may complete a buffer it was never
    /// given, or claim more bytes than the buffer holds.
    pub fn push_used(&self, queue: usize, id: u16, len: u32) {
        let st = self.state.lock().unwrap();
        let q = &st.queues[queue];
        // used ring: flags u16, idx u16, ring[size] {id u32, len u32}.
        // SAFETY: inside the used ring the driver registered.
        unsafe {
            let idx: u16 = rd(q.used + 2);
            let e = q.used + 4 + 8 * u64::from(idx % q.size);
            wr(e, u32::from(id));
            wr(e + 4, len);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            wr(q.used + 2, idx.wrapping_add(1));
        }
    }

    /// Puts `frame` into the next RX buffer, claiming `claimed_len` bytes of
    /// frame (a lying device may claim more than it wrote). False when the
    /// driver has no buffer posted.
    #[must_use]
    pub fn deliver(&self, frame: &[u8], claimed_len: usize) -> bool {
        let Some((id, addr, cap)) = self.pop_avail(0) else {
            return false;
        };
        // A recycled entry (see `complete_tx`): nothing to write into.
        if addr == 0 || (cap as usize) < NET_HDR_LEN {
            self.push_used(0, id, 0);
            return true;
        }
        let n = (NET_HDR_LEN + frame.len()).min(cap as usize);
        // SAFETY: the driver posted `cap` writable bytes at `addr`.
        unsafe {
            std::ptr::write_bytes(addr as *mut u8, 0, NET_HDR_LEN);
            std::ptr::copy_nonoverlapping(
                frame.as_ptr(),
                (addr as *mut u8).add(NET_HDR_LEN),
                n - NET_HDR_LEN,
            );
        }
        self.push_used(0, id, (NET_HDR_LEN + claimed_len) as u32);
        true
    }

    /// Completes up to `n` pending transmissions; returns the frames sent.
    #[must_use]
    pub fn complete_tx(&self, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < n {
            let Some((id, addr, len)) = self.pop_avail(1) else {
                break;
            };
            // After this device completed a buffer it was never given (a lie
            // `push_used` can tell), the driver may have recycled the entry:
            // a header-less or null buffer is sent as an empty frame.
            if addr == 0 || (len as usize) < NET_HDR_LEN {
                out.push(Vec::new());
                self.push_used(1, id, 0);
                continue;
            }
            // SAFETY: the driver posted `len` readable bytes at `addr`.
            let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
            out.push(bytes[NET_HDR_LEN..].to_vec());
            self.push_used(1, id, 0);
        }
        out
    }
}

/// Plays a lying device against the virtio-net driver: `input` is read as
/// 8-byte operations (kind, queue, id as u16, length as u32), at most 512,
/// mixing completions of buffers never given, frames claiming any length,
/// and the driver's own sends, receives and reaping. The first byte picks
/// poll or interrupt mode. The `guest_used_ring` fuzz target and the
/// driver's regression tests both run inputs through it; `None` when the
/// driver refused to start.
#[must_use]
pub fn replay_lying_device(
    input: &[u8],
) -> Option<(crate::net::NetDevice<TestHal, FakeNet>, Device)> {
    use crate::net::{NetDevice, RxMode};
    let (transport, device) = FakeNet::new();
    let mode = if input.first().is_some_and(|b| b & 1 == 0) {
        RxMode::Poll
    } else {
        RxMode::Interrupt
    };
    let mut dev = NetDevice::<TestHal, _>::new(transport, mode).ok()?;
    let payload = [0xA5u8; 2048];
    for op in input.chunks_exact(8).take(512) {
        let id = u16::from_le_bytes([op[2], op[3]]);
        let len = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        match op[0] % 6 {
            // A completion the device makes up.
            0 => device.push_used(usize::from(op[1] & 1), id, len),
            // A frame in the next posted RX buffer, claiming any length.
            1 => {
                let n = usize::from(id) % payload.len();
                let _ = device.deliver(&payload[..n], len as usize % 0x1_0000);
            }
            2 => {
                let _ = dev.receive();
            }
            3 => {
                let _ = dev.send(&payload[..usize::from(id) % 1600]);
            }
            4 => {
                let _ = dev.reap_tx();
                let _ = dev.rx_pending();
            }
            _ => {
                let _ = device.complete_tx(usize::from(op[1]));
            }
        }
    }
    Some((dev, device))
}
