//! End to end without KVM: a test "driver" programs two virtio-net functions
//! through their BAR registers (as a guest would), and a frame sent by one
//! arrives in the other's RX ring through the switch, with an MSI-X interrupt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::counters::{Reject, RejectCounters};
use crate::devices::net::{HDR_LEN, Net};
use crate::devices::switch::Switch;
use crate::kvm::memory::GuestMem;
use crate::pci::PciDevice;
use crate::pci::msix::tests::FakeRouter;
use crate::pci::msix::{CONTROL_ENABLE, Msix};
use crate::pci::virtio_pci::{
    F_VERSION_1, MSIX_TABLE, NOTIFY, NOTIFY_MULTIPLIER, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK,
    S_FEATURES_OK, VirtioPci,
};

const QSIZE: u64 = 16;

fn w8(d: &mut VirtioPci, off: u64, v: u8) -> Option<Reject> {
    d.bar_write(0, off, &[v])
}
fn w16(d: &mut VirtioPci, off: u64, v: u16) -> Option<Reject> {
    d.bar_write(0, off, &v.to_le_bytes())
}
fn w32(d: &mut VirtioPci, off: u64, v: u32) -> Option<Reject> {
    d.bar_write(0, off, &v.to_le_bytes())
}
fn r8(d: &mut VirtioPci, off: u64) -> u8 {
    let mut b = [0u8];
    d.bar_read(0, off, &mut b);
    b[0]
}

/// Rings of queue `q` live at base + q * 0x4000: desc, avail (+0x1000), used (+0x2000).
fn ring_base(base: u64, q: u16) -> u64 {
    base + u64::from(q) * 0x4000
}

/// Brings the device up like a virtio 1.2 §3.1.1 driver: features, queues, vectors, DRIVER_OK.
fn bring_up(d: &mut VirtioPci, msix: &Msix, base: u64) {
    w8(d, 0x14, S_ACKNOWLEDGE | S_DRIVER);
    w32(d, 0x08, 1);
    w32(d, 0x0C, (F_VERSION_1 >> 32) as u32);
    assert_eq!(w8(d, 0x14, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), None);
    assert_ne!(r8(d, 0x14) & S_FEATURES_OK, 0, "features accepted");
    for q in 0..2u16 {
        w16(d, 0x16, q);
        w16(d, 0x18, QSIZE as u16);
        w16(d, 0x1A, q); // MSI-X vector q
        let b = ring_base(base, q);
        w32(d, 0x20, b as u32);
        w32(d, 0x24, 0);
        w32(d, 0x28, (b + 0x1000) as u32);
        w32(d, 0x2C, 0);
        w32(d, 0x30, (b + 0x2000) as u32);
        w32(d, 0x34, 0);
        assert_eq!(w16(d, 0x1C, 1), None);
        // Program and unmask the vector: an x86 MSI to APIC 0, vector 0x40 + q.
        d.bar_write(
            0,
            MSIX_TABLE + u64::from(q) * 16,
            &0xFEE0_0000u32.to_le_bytes(),
        );
        d.bar_write(
            0,
            MSIX_TABLE + u64::from(q) * 16 + 8,
            &(0x40 + u32::from(q)).to_le_bytes(),
        );
        d.bar_write(0, MSIX_TABLE + u64::from(q) * 16 + 12, &0u32.to_le_bytes());
    }
    msix.set_control(CONTROL_ENABLE);
    assert_eq!(
        w8(
            d,
            0x14,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        ),
        None
    );
}

/// Posts one buffer (descriptor 0) on queue `q` and notifies.
fn post(d: &mut VirtioPci, mem: &GuestMem, base: u64, q: u16, buf: u64, len: u32, write: bool) {
    let b = ring_base(base, q);
    // Descriptor: addr u64, len u32, flags u16 (2 = WRITE), next u16 (virtio 1.2 §2.7.5).
    mem.write_obj(buf, GuestAddress(b)).unwrap();
    mem.write_obj(len, GuestAddress(b + 8)).unwrap();
    mem.write_obj(if write { 2u16 } else { 0 }, GuestAddress(b + 12))
        .unwrap();
    mem.write_obj(0u16, GuestAddress(b + 4 + 0x1000)).unwrap(); // avail.ring[0] = 0
    mem.write_obj(1u16, GuestAddress(b + 2 + 0x1000)).unwrap(); // avail.idx = 1
    d.bar_write(
        0,
        NOTIFY + u64::from(q) * u64::from(NOTIFY_MULTIPLIER),
        &q.to_le_bytes(),
    );
}

fn used_idx(mem: &GuestMem, base: u64, q: u16) -> u16 {
    mem.read_obj(GuestAddress(ring_base(base, q) + 0x2000 + 2))
        .unwrap()
}

fn nic(
    name: &str,
    mac: [u8; 6],
    sw: &Arc<Switch>,
    mem: &GuestMem,
) -> (VirtioPci, Arc<Msix>, Arc<crate::devices::net::NetCounters>) {
    let net = Net::new(name, mac, sw.clone(), Arc::new(RejectCounters::default())).unwrap();
    let counters = net.counters.clone();
    let msix = Arc::new(Msix::new(3, Arc::new(FakeRouter::default())).unwrap());
    let d = VirtioPci::new(
        name,
        Box::new(net),
        msix.clone(),
        mem.clone(),
        None,
        0xC000_0000,
    )
    .unwrap();
    (d, msix, counters)
}

#[test]
fn a_frame_crosses_the_switch_between_two_nics() {
    let sw = Arc::new(Switch::default());
    let mem_a = crate::kvm::memory::create("a", 8 << 20).unwrap();
    let mem_b = crate::kvm::memory::create("b", 8 << 20).unwrap();
    let (mut a, msix_a, ca) = nic("a", [2, 0, 0, 0, 0, 0xA], &sw, &mem_a);
    let (mut b, msix_b, cb) = nic("b", [2, 0, 0, 0, 0, 0xB], &sw, &mem_b);
    bring_up(&mut a, &msix_a, 0x10_0000);
    bring_up(&mut b, &msix_b, 0x10_0000);
    // B offers an RX buffer; A sends a broadcast frame.
    post(&mut b, &mem_b, 0x10_0000, 0, 0x30_0000, 2048, true);
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend_from_slice(&[0xFF; 6]);
    pkt.extend_from_slice(&[2, 0, 0, 0, 0, 0xA]);
    pkt.extend_from_slice(&[0x88, 0xB5]);
    pkt.extend_from_slice(b"exitless says hi");
    mem_a.write_slice(&pkt, GuestAddress(0x30_0000)).unwrap();
    post(
        &mut a,
        &mem_a,
        0x10_0000,
        1,
        0x30_0000,
        pkt.len() as u32,
        false,
    );

    let t = Instant::now();
    while used_idx(&mem_b, 0x10_0000, 0) != 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "frame never arrived");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut got = vec![0u8; pkt.len()];
    mem_b.read_slice(&mut got, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(&got[HDR_LEN..], &pkt[HDR_LEN..]);
    let used_len: u32 = mem_b
        .read_obj(GuestAddress(ring_base(0x10_0000, 0) + 0x2000 + 8))
        .unwrap();
    assert_eq!(used_len as usize, pkt.len());
    assert_eq!(used_idx(&mem_a, 0x10_0000, 1), 1, "A's TX buffer returned");
    assert_eq!(ca.tx_packets.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(cb.rx_packets.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        ca.notifications[1].load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Both sides were interrupted on their queue's vector.
    while msix_b.delivered.load(std::sync::atomic::Ordering::Relaxed) < 1
        || msix_a.delivered.load(std::sync::atomic::Ordering::Relaxed) < 1
    {
        assert!(t.elapsed() < Duration::from_secs(5), "no MSI-X interrupt");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn hostile_transport_writes_are_refused() {
    let sw = Arc::new(Switch::default());
    let mem = crate::kvm::memory::create("h", 8 << 20).unwrap();
    let (mut d, _msix, _) = nic("h", [2, 0, 0, 0, 0, 1], &sw, &mem);
    // Features the device never offered: FEATURES_OK stays clear.
    w32(&mut d, 0x08, 0);
    w32(&mut d, 0x0C, 0xFFFF_FFFF);
    assert_eq!(
        w8(&mut d, 0x14, S_FEATURES_OK),
        Some(Reject::VirtioBadRegister)
    );
    assert_eq!(r8(&mut d, 0x14) & S_FEATURES_OK, 0);
    w8(&mut d, 0x14, 0); // reset
    // Queue size not a power of two / above the maximum.
    assert_eq!(w16(&mut d, 0x18, 3), Some(Reject::VirtioBadQueue));
    assert_eq!(w16(&mut d, 0x18, 4096), Some(Reject::VirtioBadQueue));
    // Disabling a queue by writing 0 is not allowed.
    assert_eq!(w16(&mut d, 0x1C, 0), Some(Reject::VirtioBadQueue));
    // Read-only and unknown registers, device config writes, odd BAR offsets.
    assert_eq!(w16(&mut d, 0x12, 9), Some(Reject::VirtioBadRegister));
    // Fields at a width not their own: refused, the registers unchanged.
    assert_eq!(w32(&mut d, 0x14, 0), Some(Reject::VirtioBadRegister));
    assert_eq!(
        w32(&mut d, 0x16, 0x0010_0001),
        Some(Reject::VirtioBadRegister)
    );
    assert_eq!(w8(&mut d, 0x17, 1), Some(Reject::VirtioBadRegister));
    let mut wide = [0u8; 8];
    assert_eq!(
        d.bar_read(0, 0x14, &mut wide),
        Some(Reject::VirtioBadRegister)
    );
    assert_eq!(wide, [0xFF; 8]);
    let mut select = [0xAAu8; 2];
    assert_eq!(d.bar_read(0, 0x16, &mut select), None);
    assert_eq!(select, [0, 0], "queue_select kept");
    assert_eq!(
        d.bar_write(0, 0x2000, &[1]),
        Some(Reject::VirtioBadRegister)
    );
    assert_eq!(
        d.bar_write(0, 0x7F00, &[1, 2, 3, 4]),
        Some(Reject::VirtioBadRegister)
    );
    assert_eq!(
        d.bar_write(0, NOTIFY + 2, &[0, 0]),
        Some(Reject::VirtioBadRegister)
    );
    assert_eq!(
        d.bar_write(0, MSIX_TABLE + 1, &[0; 4]),
        Some(Reject::MsixBadAccess)
    );
    // Rings outside RAM: DRIVER_OK fails the device instead of crashing.
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0C, 1);
    w8(&mut d, 0x14, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    w16(&mut d, 0x16, 0);
    w32(&mut d, 0x20, 0xF000_0000);
    w16(&mut d, 0x1C, 1);
    assert_eq!(
        w8(
            &mut d,
            0x14,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        ),
        Some(Reject::VirtioBadQueue)
    );
    assert_ne!(
        r8(&mut d, 0x14) & 0x80,
        0,
        "DEVICE_NEEDS_RESET/FAILED shown"
    );
}

/// Writes an Ethernet frame (after the virtio-net header) at `buf` and sends it
/// on TX; waits for the device to hand the buffer back.
fn transmit(d: &mut VirtioPci, mem: &GuestMem, dst: [u8; 6], src: [u8; 6], body: &[u8]) {
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend_from_slice(&dst);
    pkt.extend_from_slice(&src);
    pkt.extend_from_slice(&[0x88, 0xB5]);
    pkt.extend_from_slice(body);
    mem.write_slice(&pkt, GuestAddress(0x30_0000)).unwrap();
    post(d, mem, 0x10_0000, 1, 0x30_0000, pkt.len() as u32, false);
    let t = Instant::now();
    while used_idx(mem, 0x10_0000, 1) != 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "TX never completed");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_guest_cannot_send_as_another_guest() {
    let sw = Arc::new(Switch::default());
    let (client, server, thief) = (
        [2, 0, 0, 0, 0, 0xA],
        [2, 0, 0, 0, 0, 0xB],
        [2, 0, 0, 0, 0, 0xC],
    );
    let mem: Vec<GuestMem> = ["a", "b", "c"]
        .iter()
        .map(|n| crate::kvm::memory::create(n, 8 << 20).unwrap())
        .collect();
    let (mut a, msix_a, ca) = nic("a", client, &sw, &mem[0]);
    let (mut b, msix_b, _) = nic("b", server, &sw, &mem[1]);
    let (mut c, msix_c, cc) = nic("c", thief, &sw, &mem[2]);
    bring_up(&mut a, &msix_a, 0x10_0000);
    bring_up(&mut b, &msix_b, 0x10_0000);
    bring_up(&mut c, &msix_c, 0x10_0000);
    post(&mut a, &mem[0], 0x10_0000, 0, 0x40_0000, 2048, true);
    // The thief answers the client as the server: its NIC takes the frame
    // (the guest cannot tell), the switch drops and counts it.
    transmit(&mut c, &mem[2], client, server, b"i am the server");
    assert_eq!(cc.tx_packets.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(sw.counters()["dropped_forged_source"], 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&mem[0], 0x10_0000, 0), 0, "the forgery arrived");
    // The real server's frame gets through, and is what the client reads.
    transmit(&mut b, &mem[1], client, server, b"the real server");
    let t = Instant::now();
    while used_idx(&mem[0], 0x10_0000, 0) != 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "frame never arrived");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut got = vec![0u8; HDR_LEN + 14 + 15];
    mem[0]
        .read_slice(&mut got, GuestAddress(0x40_0000))
        .unwrap();
    assert_eq!(&got[HDR_LEN + 14..], b"the real server");
    assert_eq!(ca.rx_packets.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(sw.counters()["dropped_forged_source"], 1);
}

#[test]
fn an_avail_index_jump_is_counted_once() {
    let sw = Arc::new(Switch::default());
    let mem = crate::kvm::memory::create("j", 8 << 20).unwrap();
    let rejects = Arc::new(RejectCounters::default());
    let net = Net::new("j", [2, 0, 0, 0, 0, 0xD], sw.clone(), rejects.clone()).unwrap();
    let msix = Arc::new(Msix::new(3, Arc::new(FakeRouter::default())).unwrap());
    let mut d = VirtioPci::new(
        "j",
        Box::new(net),
        msix.clone(),
        mem.clone(),
        None,
        0xC000_0000,
    )
    .unwrap();
    bring_up(&mut d, &msix, 0x10_0000);
    // The driver claims 1000 new TX chains in a ring of 16, and kicks twice.
    let b = ring_base(0x10_0000, 1);
    mem.write_obj(1000u16, GuestAddress(b + 2 + 0x1000))
        .unwrap();
    let kick = NOTIFY + u64::from(NOTIFY_MULTIPLIER);
    d.bar_write(0, kick, &1u16.to_le_bytes());
    let t = Instant::now();
    while rejects.count(Reject::VirtioAvailJump) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the jump was not counted"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    d.bar_write(0, kick, &1u16.to_le_bytes());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rejects.count(Reject::VirtioAvailJump), 1, "once per jump");
    assert_eq!(used_idx(&mem, 0x10_0000, 1), 0, "nothing was taken");
}

fn used_flags(mem: &GuestMem, base: u64, q: u16) -> u16 {
    mem.read_obj(GuestAddress(ring_base(base, q) + 0x2000))
        .unwrap()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// virtio 1.2 §2.7.7.1: the RX queue asks for no refill notifications while
/// it has buffers, asks for the next one when frames wait for a buffer, and
/// stops asking once the refill came; a hostile avail index makes it give up
/// looking (counted) instead of spinning on buffers that never pop.
#[test]
fn rx_refill_notifications_are_asked_for_only_when_frames_wait() {
    const NO_NOTIFY: u16 = 1;
    let sw = Arc::new(Switch::default());
    let mem_a = crate::kvm::memory::create("a", 8 << 20).unwrap();
    let mem_b = crate::kvm::memory::create("b", 8 << 20).unwrap();
    let rejects_b = Arc::new(RejectCounters::default());
    let (mut a, msix_a, _) = nic("a", [2, 0, 0, 0, 0, 0xA], &sw, &mem_a);
    let net_b = Net::new("b", [2, 0, 0, 0, 0, 0xB], sw.clone(), rejects_b.clone()).unwrap();
    let cb = net_b.counters.clone();
    let msix_b = Arc::new(Msix::new(3, Arc::new(FakeRouter::default())).unwrap());
    let mut b = VirtioPci::new(
        "b",
        Box::new(net_b),
        msix_b.clone(),
        mem_b.clone(),
        None,
        0xC000_0000,
    )
    .unwrap();
    bring_up(&mut a, &msix_a, 0x10_0000);
    bring_up(&mut b, &msix_b, 0x10_0000);
    assert_eq!(
        used_flags(&mem_b, 0x10_0000, 0),
        NO_NOTIFY,
        "a fresh RX queue asks for no refill notifications"
    );
    // A frame for B, which has no buffer: it waits, and B's queue asks.
    transmit(
        &mut a,
        &mem_a,
        [2, 0, 0, 0, 0, 0xB],
        [2, 0, 0, 0, 0, 0xA],
        b"one",
    );
    wait_for("the RX queue never asked for a refill", || {
        used_flags(&mem_b, 0x10_0000, 0) == 0
    });
    // The refill (posted and notified) takes the frame; the queue is quiet again.
    post(&mut b, &mem_b, 0x10_0000, 0, 0x30_0000, 2048, true);
    wait_for("the waiting frame never arrived", || {
        used_idx(&mem_b, 0x10_0000, 0) == 1
    });
    wait_for("the queue kept asking after the refill", || {
        used_flags(&mem_b, 0x10_0000, 0) == NO_NOTIFY
    });
    assert_eq!(cb.rx_packets.load(std::sync::atomic::Ordering::Relaxed), 1);
    // A hostile avail index (far beyond the ring) with a frame waiting: the
    // device looks once more, gives up, counts the jump and stays live.
    mem_b
        .write_obj(1000u16, GuestAddress(ring_base(0x10_0000, 0) + 2 + 0x1000))
        .unwrap();
    let mem_a2 = mem_a.clone();
    let b_used = ring_base(0x10_0000, 1) + 0x2000 + 2;
    // A's TX descriptor 0 is reused: its used index moves to 2.
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend_from_slice(&[2, 0, 0, 0, 0, 0xB, 2, 0, 0, 0, 0, 0xA, 0x88, 0xB5]);
    pkt.extend_from_slice(b"two");
    mem_a.write_slice(&pkt, GuestAddress(0x30_0000)).unwrap();
    let tb = ring_base(0x10_0000, 1);
    mem_a
        .write_obj(0u16, GuestAddress(tb + 6 + 0x1000))
        .unwrap(); // avail.ring[1] = 0
    mem_a
        .write_obj(2u16, GuestAddress(tb + 2 + 0x1000))
        .unwrap(); // avail.idx = 2
    a.bar_write(
        0,
        NOTIFY + u64::from(NOTIFY_MULTIPLIER),
        &1u16.to_le_bytes(),
    );
    wait_for("A's second frame never left", || {
        mem_a2.read_obj::<u16>(GuestAddress(b_used)).unwrap() == 2
    });
    wait_for("the RX avail index jump was never counted", || {
        rejects_b.snapshot().get("virtio_avail_index_jump") == Some(&1)
    });
    assert_eq!(cb.rx_packets.load(std::sync::atomic::Ordering::Relaxed), 1);
}
