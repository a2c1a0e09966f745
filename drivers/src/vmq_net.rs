//! A second NIC type: Ethernet frames carried over VM queues (M5),
//! as a smoltcp `phy::Device`, so the same stack runs over it unchanged.
//!
//! The queue itself belongs to the guest kernel (which depends on this
//! crate, not the other way round): it reaches the device as a
//! [`FrameLink`] — "send one frame to the peer, take one received frame, is
//! one waiting, deliver what is queued". One VM-queue message is one
//! Ethernet frame (no FCS), so there is no framing on the wire beyond the
//! message length; what this module adds is the checking a NIC does:
//! arrivals shorter than an Ethernet header or longer than the MTU allows
//! are dropped and counted, never handed to smoltcp, and a frame the link
//! refuses is counted as a NIC's full ring would be.
//!
//! There is no switch: every frame, broadcast (ARP) included, goes to the
//! one peer the link was opened for.

use alloc::vec;
use alloc::vec::Vec;
use smoltcp::phy::{self, DeviceCapabilities, Medium};

// The same owned-frame RX token as the virtio-net device.
use crate::net::RxFrame;

pub use crate::net::{ETH_HEADER_LEN, MAX_FRAME_LEN, NetStats};

/// Why a link did not take a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// No room to queue it now (the outbox is full even after delivering).
    Full,
    /// The queue refused it (no such peer, peer exited, bad descriptor...).
    Refused,
}

/// One guest's end of a frame-carrying VM queue (the guest kernel's
/// `rt::vmq_link` implements it; tests use an in-memory pair).
pub trait FrameLink {
    /// Queues one frame for the peer. The link copies it: `frame` may be
    /// reused when this returns.
    fn send(&mut self, frame: &[u8]) -> Result<(), LinkError>;
    /// Takes the oldest received message, lends its bytes to `take`, then
    /// releases it; `None` when nothing is waiting.
    fn recv<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<R>;
    /// A received message is waiting (a plain memory read for VM queues).
    fn rx_pending(&self) -> bool;
    /// Room to queue a frame now.
    fn can_send(&self) -> bool {
        true
    }
    /// Delivers frames queued by `send` that are not yet delivered (a lazy
    /// link's one exit for a batch); nothing for links that deliver at once.
    fn flush(&mut self) {}
}

/// A locally administered unicast MAC for VM-queue guest `id` (IEEE 802
/// §8.2: bit 1 of the first octet set = local, bit 0 clear = unicast).
#[must_use]
pub fn mac_for(id: u32) -> [u8; 6] {
    let b = id.to_be_bytes();
    [0x02, 0x51, b[0], b[1], b[2], b[3]]
}

/// The smoltcp device over a [`FrameLink`].
#[derive(Debug)]
pub struct VmqNet<L> {
    link: L,
    mac: [u8; 6],
    /// smoltcp builds each outgoing frame here before the link copies it.
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl<L: FrameLink> VmqNet<L> {
    pub fn new(link: L, mac: [u8; 6]) -> Self {
        Self {
            link,
            mac,
            tx_buf: vec![0u8; MAX_FRAME_LEN],
            stats: NetStats::default(),
        }
    }

    #[must_use]
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    #[must_use]
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    #[must_use]
    pub fn rx_pending(&self) -> bool {
        self.link.rx_pending()
    }

    /// Delivers whatever the last `iface.poll` queued (see [`FrameLink::flush`]).
    pub fn flush(&mut self) {
        self.link.flush();
    }

    #[must_use]
    pub fn link(&self) -> &L {
        &self.link
    }

    pub fn link_mut(&mut self) -> &mut L {
        &mut self.link
    }

    /// The next frame fit for smoltcp; bad arrivals on the way are dropped
    /// and counted (taking them keeps the queue moving).
    pub fn receive(&mut self) -> Option<Vec<u8>> {
        loop {
            let stats = &mut self.stats;
            let frame = self.link.recv(|b| {
                if b.len() < ETH_HEADER_LEN {
                    stats.rx_dropped_short += 1;
                    None
                } else if b.len() > MAX_FRAME_LEN {
                    stats.rx_dropped_oversize += 1;
                    None
                } else {
                    stats.rx_packets += 1;
                    stats.rx_bytes += b.len() as u64;
                    Some(b.to_vec())
                }
            })?;
            if frame.is_some() {
                return frame;
            }
        }
    }

    /// Sends `len` bytes that `fill` writes; `fill` runs even when the frame
    /// is then dropped (smoltcp expects its closure to run).
    pub fn send_with<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        if !(ETH_HEADER_LEN..=MAX_FRAME_LEN).contains(&len) {
            self.stats.tx_errors += 1;
            return fill(&mut vec![0u8; len]);
        }
        let r = fill(&mut self.tx_buf[..len]);
        match self.link.send(&self.tx_buf[..len]) {
            Ok(()) => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += len as u64;
            }
            Err(LinkError::Full) => self.stats.tx_ring_full += 1,
            Err(LinkError::Refused) => self.stats.tx_errors += 1,
        }
        r
    }
}

/// Permission to send one frame.
pub struct TxSlot<'a, L>(&'a mut VmqNet<L>);

impl<L: FrameLink> phy::TxToken for TxSlot<'_, L> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.send_with(len, f)
    }
}

impl<L: FrameLink> phy::Device for VmqNet<L> {
    type RxToken<'a>
        = RxFrame
    where
        Self: 'a;
    type TxToken<'a>
        = TxSlot<'a, L>
    where
        Self: 'a;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = VmqNet::receive(self)?;
        Some((RxFrame(frame), TxSlot(self)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if self.link.can_send() {
            Some(TxSlot(self))
        } else {
            self.stats.tx_ring_full += 1;
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME_LEN;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::phy::Device;
    use smoltcp::socket::udp;
    use smoltcp::time::Instant;
    use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    type Queue = Rc<RefCell<VecDeque<Vec<u8>>>>;

    /// One end of an in-memory queue pair, lazy like a VM queue under the
    /// lazy policy: sent frames reach the peer only at `flush`.
    struct FakeLink {
        rx: Queue,
        tx: Queue,
        outbox: Vec<Vec<u8>>,
        capacity: usize,
        refuse: bool,
        flushes: usize,
    }

    fn pair(capacity: usize) -> (FakeLink, FakeLink) {
        let (a, b): (Queue, Queue) = Default::default();
        let end = |rx: &Queue, tx: &Queue| FakeLink {
            rx: rx.clone(),
            tx: tx.clone(),
            outbox: Vec::new(),
            capacity,
            refuse: false,
            flushes: 0,
        };
        (end(&a, &b), end(&b, &a))
    }

    impl FrameLink for FakeLink {
        fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
            if self.refuse {
                return Err(LinkError::Refused);
            }
            if self.outbox.len() >= self.capacity {
                return Err(LinkError::Full);
            }
            self.outbox.push(frame.to_vec());
            Ok(())
        }
        fn recv<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<R> {
            let m = self.rx.borrow_mut().pop_front()?;
            Some(take(&m))
        }
        fn rx_pending(&self) -> bool {
            !self.rx.borrow().is_empty()
        }
        fn can_send(&self) -> bool {
            self.outbox.len() < self.capacity
        }
        fn flush(&mut self) {
            self.flushes += 1;
            self.tx.borrow_mut().extend(self.outbox.drain(..));
        }
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        vec![fill; len]
    }

    #[test]
    fn frames_arrive_whole_and_in_order_and_bad_lengths_are_dropped() {
        let (a, b) = pair(64);
        let mut dev = VmqNet::new(a, mac_for(1));
        for m in [
            frame(60, 1),
            frame(ETH_HEADER_LEN - 1, 2),
            frame(MAX_FRAME_LEN + 1, 3),
            frame(0, 4),
            frame(MAX_FRAME_LEN, 5),
            frame(ETH_HEADER_LEN, 6),
        ] {
            b.tx.borrow_mut().push_back(m);
        }
        assert!(dev.rx_pending());
        assert_eq!(dev.receive(), Some(frame(60, 1)));
        // The runt, the oversize and the empty message are skipped, not fatal.
        assert_eq!(dev.receive(), Some(frame(MAX_FRAME_LEN, 5)));
        assert_eq!(dev.receive(), Some(frame(ETH_HEADER_LEN, 6)));
        assert_eq!(dev.receive(), None);
        assert!(!dev.rx_pending());
        let s = dev.stats();
        assert_eq!(s.rx_packets, 3);
        assert_eq!(s.rx_bytes, (60 + MAX_FRAME_LEN + ETH_HEADER_LEN) as u64);
        assert_eq!(s.rx_dropped_short, 2);
        assert_eq!(s.rx_dropped_oversize, 1);
    }

    #[test]
    fn sends_reach_the_peer_at_flush_and_bad_or_refused_frames_are_counted() {
        let (a, mut b) = pair(2);
        let mut dev = VmqNet::new(a, mac_for(1));
        let t = Instant::from_millis(0);
        let tok = dev.transmit(t).expect("room");
        phy::TxToken::consume(tok, 60, |buf| buf.fill(7));
        let tok = dev.transmit(t).expect("room");
        phy::TxToken::consume(tok, 100, |buf| buf.fill(8));
        // Outbox full: smoltcp is told to hold the frame (back pressure).
        assert!(dev.transmit(t).is_none());
        assert!(!b.rx_pending(), "a lazy link delivers nothing before flush");
        dev.flush();
        assert_eq!(dev.link().flushes, 1);
        assert_eq!(b.recv(<[u8]>::to_vec), Some(frame(60, 7)));
        assert_eq!(b.recv(<[u8]>::to_vec), Some(frame(100, 8)));
        // Lengths a NIC cannot put on the wire run the closure and are dropped.
        let mut ran = 0;
        dev.send_with(MAX_FRAME_LEN + 1, |_| ran += 1);
        dev.send_with(ETH_HEADER_LEN - 1, |_| ran += 1);
        assert_eq!(ran, 2);
        dev.link.refuse = true;
        dev.send_with(60, |_| ran += 1);
        assert_eq!(ran, 3);
        dev.flush();
        assert!(!b.rx_pending());
        let s = dev.stats();
        assert_eq!((s.tx_packets, s.tx_bytes), (2, 160));
        assert_eq!((s.tx_ring_full, s.tx_errors), (1, 3));
    }

    #[test]
    fn mac_addresses_are_local_unicast_and_distinct_per_guest() {
        let (m1, m2) = (mac_for(1), mac_for(2));
        assert_ne!(m1, m2);
        for m in [m1, m2, mac_for(u32::MAX)] {
            assert_eq!(m[0] & 0b11, 0b10, "{m:02x?}");
            assert!(EthernetAddress(m).is_unicast());
        }
    }

    fn iface(dev: &mut VmqNet<FakeLink>, ip: [u8; 4]) -> Interface {
        let mac = EthernetAddress(dev.mac());
        let mut i = Interface::new(
            Config::new(HardwareAddress::Ethernet(mac)),
            dev,
            Instant::ZERO,
        );
        i.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(ip[0], ip[1], ip[2], ip[3]), 24));
        });
        i
    }

    fn udp_socket(port: u16) -> udp::Socket<'static> {
        let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0u8; 8192]);
        let mut s = udp::Socket::new(buf(), buf());
        s.bind(port).expect("bind");
        s
    }

    /// smoltcp, unchanged, resolves the peer by ARP (a broadcast, carried
    /// to the one peer) and exchanges UDP datagrams over the device.
    #[test]
    fn smoltcp_talks_udp_across_a_link_pair_arp_included() {
        let (a, b) = pair(64);
        let (mut da, mut db) = (VmqNet::new(a, mac_for(1)), VmqNet::new(b, mac_for(2)));
        let (mut ia, mut ib) = (iface(&mut da, [10, 0, 0, 1]), iface(&mut db, [10, 0, 0, 2]));
        let (mut sa, mut sb) = (SocketSet::new(Vec::new()), SocketSet::new(Vec::new()));
        let ha = sa.add(udp_socket(7));
        let hb = sb.add(udp_socket(8));
        let to_a = IpEndpoint::new(IpAddress::v4(10, 0, 0, 1), 7);
        let mut echoed = 0;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for seq in 0u8..5 {
            sb.get_mut::<udp::Socket>(hb)
                .send_slice(&[seq; 20], to_a)
                .expect("queue");
            for step in 0..20 {
                let now = Instant::from_millis(i64::from(seq) * 100 + step);
                ib.poll(now, &mut db, &mut sb);
                db.flush();
                ia.poll(now, &mut da, &mut sa);
                let s = sa.get_mut::<udp::Socket>(ha);
                while let Ok((n, meta)) = s.recv_slice(&mut buf) {
                    s.send_slice(&buf[..n], meta.endpoint).expect("echo");
                    echoed += 1;
                }
                ia.poll(now, &mut da, &mut sa);
                da.flush();
                let s = sb.get_mut::<udp::Socket>(hb);
                while let Ok((n, _)) = s.recv_slice(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
                if got.len() > usize::from(seq) {
                    break;
                }
            }
        }
        assert_eq!(echoed, 5);
        assert_eq!(got, (0u8..5).map(|s| vec![s; 20]).collect::<Vec<_>>());
        // ARP request and reply crossed the link too, beyond the 5 datagrams.
        assert!(da.stats().tx_packets > 5 && db.stats().tx_packets > 5);
        assert_eq!(da.stats().rx_dropped_short + db.stats().rx_dropped_short, 0);
    }
}
