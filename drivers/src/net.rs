//! virtio-net (virtio 1.2 §5.1) over [`MsixPciTransport`](crate::virtio_pci::MsixPciTransport)
//! or any `Transport`, with the queue work done by the caller's thread (ring 3).
//!
//! - RX: every descriptor is pre-posted with a buffer at start; a received
//!   frame is copied out and its buffer re-posted at once. Two modes: busy
//!   polling of the used ring (device notifications suppressed) or interrupt
//!   driven (notifications on; the caller waits for the queue's vector).
//! - TX: non-blocking. Completed buffers are reaped before each send and
//!   recycled; a full ring refuses the frame ([`SendError::Full`]) — back
//!   pressure, never a spin.
//! - EVENT_IDX is negotiated where the device offers it (virtio-drivers does).
//! - Guest-facing safety: frames shorter than an Ethernet header or longer
//!   than the MTU allows are dropped and counted, not passed on.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use virtio_drivers::Hal;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::Transport;

/// Descriptors per queue.
pub const QUEUE_SIZE: usize = 64;
/// Bytes per buffer: a virtio-net header and a full Ethernet frame fit.
pub const BUF_LEN: usize = 2048;
/// Ethernet header (destination, source, EtherType).
pub const ETH_HEADER_LEN: usize = 14;
/// Largest frame without FCS for a 1500-byte MTU.
pub const MAX_FRAME_LEN: usize = 1514;

/// Queue indices (virtio 1.2 §5.1.2).
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxMode {
    /// Busy-poll the used ring; the device sends no RX interrupts.
    Poll,
    /// Sleep until the RX vector fires.
    Interrupt,
}

#[derive(Debug)]
pub enum NetError {
    Virtio(virtio_drivers::Error),
    /// The device could not take a receive buffer at start-up.
    RxPost(virtio_drivers::Error),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => write!(f, "virtio-net: {e}"),
            Self::RxPost(e) => write!(f, "virtio-net: posting receive buffers failed: {e}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// Every TX descriptor is in flight: try again after completions.
    Full,
    /// Longer than [`MAX_FRAME_LEN`] or shorter than an Ethernet header.
    BadLength(usize),
    /// The device refused the descriptor.
    Device,
}

/// Counters; everything dropped is counted here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_completions: u64,
    /// Frames shorter than an Ethernet header.
    pub rx_dropped_short: u64,
    /// Frames longer than [`MAX_FRAME_LEN`].
    pub rx_dropped_oversize: u64,
    /// Completions the device reported inconsistently.
    pub rx_errors: u64,
    /// Sends refused because the ring was full (back pressure).
    pub tx_ring_full: u64,
    pub tx_errors: u64,
}

pub struct NetDevice<H: Hal, T: Transport> {
    raw: VirtIONetRaw<H, T, QUEUE_SIZE>,
    rx: Vec<Option<Box<[u8]>>>,
    tx: Vec<Option<(Box<[u8]>, usize)>>,
    tx_pool: Vec<Box<[u8]>>,
    mode: RxMode,
    stats: NetStats,
}

impl<H: Hal, T: Transport> fmt::Debug for NetDevice<H, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetDevice")
            .field("mode", &self.mode)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<H: Hal, T: Transport> NetDevice<H, T> {
    /// Initialises the device on `transport` and posts every receive buffer.
    pub fn new(transport: T, mode: RxMode) -> Result<Self, NetError> {
        let raw = VirtIONetRaw::<H, T, QUEUE_SIZE>::new(transport).map_err(NetError::Virtio)?;
        let mut dev = Self {
            raw,
            rx: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_pool: Vec::new(),
            mode,
            stats: NetStats::default(),
        };
        for _ in 0..QUEUE_SIZE {
            dev.post_rx(vec![0u8; BUF_LEN].into_boxed_slice())
                .map_err(NetError::RxPost)?;
        }
        dev.set_mode(mode);
        Ok(dev)
    }

    #[must_use]
    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    #[must_use]
    pub const fn stats(&self) -> NetStats {
        self.stats
    }

    #[must_use]
    pub const fn mode(&self) -> RxMode {
        self.mode
    }

    /// Switches RX between polling and interrupts (device notifications off/on).
    pub fn set_mode(&mut self, mode: RxMode) {
        self.mode = mode;
        match mode {
            RxMode::Poll => self.raw.disable_interrupts(),
            RxMode::Interrupt => self.raw.enable_interrupts(),
        }
    }

    fn post_rx(&mut self, mut buf: Box<[u8]>) -> Result<(), virtio_drivers::Error> {
        // SAFETY: the buffer lives in `self.rx` until its completion is popped
        // in `receive`, and is not touched meanwhile.
        let token = unsafe { self.raw.receive_begin(&mut buf)? };
        match self.rx.get_mut(usize::from(token)) {
            Some(slot) => {
                *slot = Some(buf);
                Ok(())
            }
            None => Err(virtio_drivers::Error::WrongToken),
        }
    }

    /// True when a received frame is waiting in the used ring.
    #[must_use]
    pub fn rx_pending(&self) -> bool {
        self.raw.poll_receive().is_some()
    }

    /// The next received frame, copied out; its buffer goes straight back to
    /// the device. Malformed frames are counted and skipped.
    pub fn receive(&mut self) -> Option<Vec<u8>> {
        loop {
            let token = self.raw.poll_receive()?;
            let Some(mut buf) = self.rx.get_mut(usize::from(token)).and_then(Option::take) else {
                // A token we never posted: the device is confused. Count it;
                // the ring cannot advance past it, so stop here.
                self.stats.rx_errors += 1;
                return None;
            };
            // SAFETY: `buf` is the buffer posted with `token`.
            let done = unsafe { self.raw.receive_complete(token, &mut buf) };
            let frame = match done {
                Ok((hdr, len)) if len < ETH_HEADER_LEN => {
                    self.stats.rx_dropped_short += 1;
                    let _ = hdr;
                    None
                }
                Ok((_, len)) if len > MAX_FRAME_LEN => {
                    self.stats.rx_dropped_oversize += 1;
                    None
                }
                Ok((hdr, len)) if hdr + len <= buf.len() => Some(buf[hdr..hdr + len].to_vec()),
                _ => {
                    self.stats.rx_errors += 1;
                    None
                }
            };
            if self.post_rx(buf).is_err() {
                self.stats.rx_errors += 1;
            }
            if let Some(f) = frame {
                self.stats.rx_packets += 1;
                self.stats.rx_bytes += f.len() as u64;
                return Some(f);
            }
        }
    }

    /// Collects finished transmissions; returns how many.
    pub fn reap_tx(&mut self) -> usize {
        let mut n = 0;
        while let Some(token) = self.raw.poll_transmit() {
            let Some((buf, len)) = self.tx.get_mut(usize::from(token)).and_then(Option::take)
            else {
                self.stats.tx_errors += 1;
                break;
            };
            // SAFETY: `buf[..len]` is the slice passed to `transmit_begin` for `token`.
            if unsafe { self.raw.transmit_complete(token, &buf[..len]) }.is_err() {
                self.stats.tx_errors += 1;
            }
            self.tx_pool.push(buf);
            n += 1;
        }
        self.stats.tx_completions += n as u64;
        n
    }

    /// True when a frame can be queued now.
    pub fn can_send(&mut self) -> bool {
        self.reap_tx();
        self.raw.can_send()
    }

    /// Queues a `len`-byte frame written by `fill`. Never waits.
    pub fn send_with<R>(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, SendError> {
        if !(ETH_HEADER_LEN..=MAX_FRAME_LEN).contains(&len) {
            self.stats.tx_errors += 1;
            return Err(SendError::BadLength(len));
        }
        if !self.can_send() {
            self.stats.tx_ring_full += 1;
            return Err(SendError::Full);
        }
        let mut buf = self
            .tx_pool
            .pop()
            .unwrap_or_else(|| vec![0u8; BUF_LEN].into_boxed_slice());
        let hdr = self
            .raw
            .fill_buffer_header(&mut buf)
            .map_err(|_| SendError::Device)?;
        let r = fill(&mut buf[hdr..hdr + len]);
        let total = hdr + len;
        // SAFETY: `buf` is kept in `self.tx` until `reap_tx` pops its completion.
        match unsafe { self.raw.transmit_begin(&buf[..total]) } {
            Ok(token) if usize::from(token) < QUEUE_SIZE => {
                self.tx[usize::from(token)] = Some((buf, total));
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += len as u64;
                Ok(r)
            }
            _ => {
                self.stats.tx_errors += 1;
                self.tx_pool.push(buf);
                Err(SendError::Device)
            }
        }
    }

    /// Queues `frame` as is.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        self.send_with(frame.len(), |b| b.copy_from_slice(frame))
    }
}

/// A received frame handed to smoltcp.
pub struct RxFrame(pub(crate) Vec<u8>);

impl phy::RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Permission to send one frame; smoltcp fills it in place.
pub struct TxSlot<'a, H: Hal, T: Transport>(&'a mut NetDevice<H, T>);

impl<H: Hal, T: Transport> phy::TxToken for TxSlot<'_, H, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut f = Some(f);
        match self
            .0
            .send_with(len, |b| (f.take().expect("called once"))(b))
        {
            Ok(r) => r,
            // smoltcp must get its closure run; the frame is then dropped (and counted).
            Err(_) => (f.take().expect("not yet called"))(&mut vec![0u8; len]),
        }
    }
}

impl<H: Hal, T: Transport> phy::Device for NetDevice<H, T> {
    type RxToken<'a>
        = RxFrame
    where
        Self: 'a;
    type TxToken<'a>
        = TxSlot<'a, H, T>
    where
        Self: 'a;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = NetDevice::receive(self)?;
        Some((RxFrame(frame), TxSlot(self)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if self.can_send() {
            Some(TxSlot(self))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME_LEN;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_device::{Device, FakeNet, MAC, TestHal};
    use std::vec::Vec;

    fn open(mode: RxMode) -> (NetDevice<TestHal, FakeNet>, Device) {
        let (transport, device) = FakeNet::new();
        (
            NetDevice::new(transport, mode).expect("init against the fake device"),
            device,
        )
    }

    fn frame(n: usize, tag: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(7) ^ tag).collect()
    }

    #[test]
    fn reads_the_mac_and_posts_every_rx_buffer() {
        let (dev, device) = open(RxMode::Poll);
        assert_eq!(dev.mac(), MAC);
        // All QUEUE_SIZE buffers are available to the device.
        for _ in 0..QUEUE_SIZE {
            assert!(device.deliver(&frame(60, 0), 60));
        }
        assert!(
            !device.deliver(&frame(60, 0), 60),
            "no buffer beyond the queue size"
        );
    }

    #[test]
    fn delivers_frames_in_order_and_reposts_buffers() {
        let (mut dev, device) = open(RxMode::Interrupt);
        for i in 0..(3 * QUEUE_SIZE) {
            let f = frame(60 + i % 100, i as u8);
            assert!(
                device.deliver(&f, f.len()),
                "a buffer was re-posted for frame {i}"
            );
            assert_eq!(dev.receive().as_deref(), Some(f.as_slice()));
        }
        assert_eq!(dev.receive(), None);
        assert_eq!(dev.stats().rx_packets, 3 * QUEUE_SIZE as u64);
    }

    #[test]
    fn short_and_oversized_frames_are_dropped_and_counted() {
        let (mut dev, device) = open(RxMode::Poll);
        assert!(device.deliver(&[1, 2, 3, 4, 5], 5));
        assert!(device.deliver(&frame(1600, 1), 1600));
        assert!(device.deliver(&frame(100, 2), 100));
        assert_eq!(
            dev.receive(),
            Some(frame(100, 2)),
            "the good frame after the bad ones"
        );
        let s = dev.stats();
        assert_eq!(
            (s.rx_dropped_short, s.rx_dropped_oversize, s.rx_packets),
            (1, 1, 1)
        );
        // Every buffer went back: the device can fill the whole ring again.
        for _ in 0..QUEUE_SIZE {
            assert!(device.deliver(&frame(60, 3), 60));
        }
    }

    #[test]
    fn a_device_claiming_more_than_the_buffer_is_an_error_not_a_panic() {
        let (mut dev, device) = open(RxMode::Poll);
        assert!(device.deliver(&frame(60, 0), BUF_LEN * 4));
        assert_eq!(dev.receive(), None);
        assert_eq!(dev.stats().rx_dropped_oversize + dev.stats().rx_errors, 1);
    }

    #[test]
    fn full_rx_ring_recovers_once_the_driver_catches_up() {
        let (mut dev, device) = open(RxMode::Poll);
        let mut delivered = 0;
        while device.deliver(&frame(64, delivered as u8), 64) {
            delivered += 1;
        }
        assert_eq!(delivered, QUEUE_SIZE);
        let mut got = 0;
        while dev.receive().is_some() {
            got += 1;
        }
        assert_eq!(got, QUEUE_SIZE);
        assert!(
            device.deliver(&frame(64, 9), 64),
            "buffers are available again"
        );
    }

    #[test]
    fn full_tx_ring_is_back_pressure_and_completions_free_it() {
        let (mut dev, device) = open(RxMode::Poll);
        let mut queued = 0;
        loop {
            match dev.send(&frame(60, queued as u8)) {
                Ok(()) => queued += 1,
                Err(e) => {
                    assert_eq!(e, SendError::Full);
                    break;
                }
            }
            assert!(
                queued <= QUEUE_SIZE,
                "the ring cannot hold more than its size"
            );
        }
        assert!(queued >= QUEUE_SIZE - 1);
        assert_eq!(dev.stats().tx_ring_full, 1);
        let sent = device.complete_tx(10);
        assert_eq!(sent.len(), 10);
        assert_eq!(
            sent[0],
            frame(60, 0),
            "frames reach the device intact and in order"
        );
        for i in 0..10 {
            dev.send(&frame(60, i)).expect("room after completions");
        }
        assert_eq!(dev.stats().tx_completions, 10);
    }

    #[test]
    fn bad_tx_lengths_are_refused() {
        let (mut dev, _device) = open(RxMode::Poll);
        assert_eq!(dev.send(&[0; 5]), Err(SendError::BadLength(5)));
        assert_eq!(
            dev.send(&vec![0; MAX_FRAME_LEN + 1]),
            Err(SendError::BadLength(MAX_FRAME_LEN + 1))
        );
        assert_eq!(dev.stats().tx_errors, 2);
    }

    /// The input the `guest_used_ring` fuzz target crashed on: the device
    /// completes a TX buffer it was never given (id 0), the driver recycles
    /// the descriptor, and the fake device then read the recycled, empty
    /// entry as a frame (a panic in the harness, not in the driver). The
    /// driver must keep working after such lies.
    #[test]
    fn fuzz_regression_completion_of_a_buffer_never_given() {
        let input: [u8; 49] = [
            0x01, 0xcf, 0xcf, 0xcf, 0xf2, 0x3f, 0xcf, 0xcf, 0xcf, 0xcf, 0x2e, 0x40, 0x00, 0xc8,
            0xfe, 0x46, 0x00, 0xcf, 0x00, 0x00, 0x40, 0x5a, 0xc8, 0x41, 0x88, 0x13, 0x00, 0xcf,
            0x2e, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0xc8, 0x41, 0x88,
            0x13, 0xff, 0x00, 0x00, 0x46, 0x00, 0x00,
        ];
        let (mut dev, device) =
            crate::fake_device::replay_lying_device(&input).expect("the driver starts");
        while dev.receive().is_some() {}
        assert!(device.deliver(&frame(100, 9), 100));
        assert_eq!(dev.receive(), Some(frame(100, 9)));
    }
}
