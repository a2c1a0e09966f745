//! The manager on plain memfd memory (no KVM): what guests see in their areas.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use para_abi::layout::area;
use para_abi::vmq::{
    self, Arrival, DirRecord, ENTRY_SIZE, Header, Message, RING_CONSUMED, RING_ENTRIES,
    RING_PRODUCED, SendStatus,
};
use vm_memory::{Bytes, GuestAddress};

use super::manager::{Drained, Manager, VmqCounters};
use super::{Area, endpoint_memory};
use crate::kvm::memory::{self, GuestMem};

const RAM: u64 = 8 << 20;

struct TestGuest {
    id: u32,
    ram: GuestMem,
    area: usize,
    counters: Arc<VmqCounters>,
    notified: Arc<AtomicU64>,
}

impl TestGuest {
    fn new(m: &Manager, name: &str) -> Self {
        let ram = memory::create(name, RAM).unwrap();
        let area = Area::new(name).unwrap();
        let base = area.base();
        let notified = Arc::new(AtomicU64::new(0));
        let n = notified.clone();
        let (id, counters) = m
            .add(
                name,
                endpoint_memory(&ram, area).unwrap(),
                Box::new(move || {
                    n.fetch_add(1, Ordering::Relaxed);
                }),
            )
            .unwrap();
        Self {
            id,
            ram,
            area: base,
            counters,
            notified,
        }
    }

    fn ctr(&self, off: u64) -> &AtomicU32 {
        // SAFETY: test areas stay mapped by the manager; aligned counter offsets.
        unsafe { &*((self.area + off as usize) as *const AtomicU32) }
    }

    fn area_bytes(&self, off: u64, len: usize) -> Vec<u8> {
        // SAFETY: inside the mapped area.
        unsafe { std::slice::from_raw_parts((self.area + off as usize) as *const u8, len) }.to_vec()
    }

    /// Reads guest-physical bytes the way the guest would: RAM or its VMQ area.
    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        if gpa >= area::VMQ {
            return self.area_bytes(gpa - area::VMQ, len);
        }
        let mut v = vec![0u8; len];
        self.ram.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn fill(&self, gpa: u64, len: usize, seed: u8) {
        let v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        self.ram.write_slice(&v, GuestAddress(gpa)).unwrap();
    }

    fn post(&self, m: Message) -> u32 {
        let p = self
            .ctr(vmq::OUTBOX + RING_PRODUCED)
            .load(Ordering::Relaxed);
        let off = vmq::OUTBOX + vmq::entry_offset(p);
        let b = m.encode();
        // SAFETY: inside the mapped area.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b.as_ptr(),
                (self.area + off as usize) as *mut u8,
                ENTRY_SIZE,
            );
        }
        self.ctr(vmq::OUTBOX + RING_PRODUCED)
            .store(p.wrapping_add(1), Ordering::Release);
        p
    }

    fn status(&self, index: u32) -> SendStatus {
        let b = self.area_bytes(vmq::OUTBOX + vmq::entry_offset(index) + 7, 1);
        SendStatus::from_raw(b[0]).unwrap()
    }

    fn inbox_len(&self) -> u32 {
        let p = self.ctr(vmq::INBOX + RING_PRODUCED).load(Ordering::Acquire);
        let c = self.ctr(vmq::INBOX + RING_CONSUMED).load(Ordering::Relaxed);
        p.wrapping_sub(c)
    }

    fn peek(&self, k: u32) -> Arrival {
        let c = self.ctr(vmq::INBOX + RING_CONSUMED).load(Ordering::Relaxed);
        let b = self.area_bytes(
            vmq::INBOX + vmq::entry_offset(c.wrapping_add(k)),
            ENTRY_SIZE,
        );
        Arrival::decode(&b.try_into().unwrap())
    }

    fn consume(&self, n: u32) {
        let c = self.ctr(vmq::INBOX + RING_CONSUMED).load(Ordering::Relaxed);
        self.ctr(vmq::INBOX + RING_CONSUMED)
            .store(c.wrapping_add(n), Ordering::Release);
    }

    fn header(&self) -> Header {
        Header::decode(&self.area_bytes(0, vmq::HEADER_SIZE).try_into().unwrap())
    }

    fn dir(&self, i: usize) -> DirRecord {
        let off = vmq::DIRECTORY + (i * vmq::DIR_RECORD_SIZE) as u64;
        DirRecord::decode(
            &self
                .area_bytes(off, vmq::DIR_RECORD_SIZE)
                .try_into()
                .unwrap(),
        )
    }
}

fn msg(dest: u32, transfer: u8, addr: u64, len: u32) -> Message {
    Message {
        dest,
        policy: 1,
        transfer,
        huge: false,
        status: 0,
        len,
        flags: 0,
        addr,
        tag: 0x7a9,
    }
}

const SRC: u64 = 0x40_0000;

#[test]
fn directory_names_every_guest_and_tracks_exits() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "read");
    let rcv = TestGuest::new(&mgr, "transform");
    let third = TestGuest::new(&mgr, "write");
    for g in [&snd, &rcv, &third] {
        let h = g.header();
        assert_eq!(
            (h.magic, h.version, h.dir_len),
            (vmq::MAGIC, vmq::VERSION, 3)
        );
        assert_eq!(h.window, area::VMQ + vmq::WINDOW);
        assert!(g.dir(0).is("read") && g.dir(1).is("transform") && g.dir(2).is("write"));
        assert_eq!(g.dir(2).flags, DirRecord::ALIVE);
    }
    assert_eq!(
        (snd.header().my_id, rcv.header().my_id, third.header().my_id),
        (0, 1, 2)
    );
    mgr.mark_exited(third.id);
    assert_eq!(snd.dir(2).flags, 0);
    assert_eq!(snd.dir(1).flags, DirRecord::ALIVE);
}

#[test]
fn copy_delivers_bytes_and_notifies_once_per_empty_inbox() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    snd.fill(SRC, 10_000, 1);
    let i0 = snd.post(msg(rcv.id, 0, SRC + 3, 10_000 - 3));
    let i1 = snd.post(msg(rcv.id, 0, SRC, 100));
    assert_eq!(
        rcv.inbox_len(),
        0,
        "lazy: nothing moves before the sender exits"
    );
    assert_eq!(
        mgr.drain(snd.id),
        Drained {
            delivered: 2,
            failed: 0
        }
    );
    assert_eq!(
        (snd.status(i0), snd.status(i1)),
        (SendStatus::Delivered, SendStatus::Delivered)
    );
    assert_eq!(rcv.inbox_len(), 2);
    assert_eq!(
        rcv.notified.load(Ordering::Relaxed),
        1,
        "only the empty → non-empty edge"
    );
    let x = rcv.peek(0);
    assert_eq!(
        (x.source, x.len, x.tag, x.transfer),
        (snd.id, 9997, 0x7a9, 0)
    );
    assert_eq!(rcv.read(x.addr, 9997), snd.read(SRC + 3, 9997));
    let y = rcv.peek(1);
    assert_eq!(rcv.read(y.addr, 100), snd.read(SRC, 100));
    assert_ne!(x.addr, y.addr);
    // The sender keeps its bytes with copy.
    assert_eq!(snd.read(SRC, 4), rcv.read(y.addr, 4));
    assert_eq!(snd.counters.delivered_copy.load(Ordering::Relaxed), 2);
    assert_eq!(snd.counters.sent_lazy.load(Ordering::Relaxed), 2);
    assert_eq!(rcv.counters.bytes_received.load(Ordering::Relaxed), 10_097);
    rcv.consume(2);
    snd.post(msg(rcv.id, 0, SRC, 1));
    mgr.drain(snd.id);
    assert_eq!(rcv.notified.load(Ordering::Relaxed), 2);
}

#[test]
fn remap_moves_pages_without_aliasing_and_recycles_them_zeroed() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    snd.fill(SRC, 4 * 4096, 9);
    let sent = snd.read(SRC, 4 * 4096);
    let i = snd.post(msg(rcv.id, 1, SRC, 4 * 4096 - 10));
    mgr.drain(snd.id);
    assert_eq!(snd.status(i), SendStatus::Delivered);
    let x = rcv.peek(0);
    assert_eq!(x.addr % 4096, 0);
    assert_eq!(
        rcv.read(x.addr, 4 * 4096),
        sent,
        "the sender's pages, whole"
    );
    assert_eq!(
        snd.read(SRC, 4 * 4096),
        vec![0u8; 4 * 4096],
        "the sender got zeroed pages"
    );
    // No aliasing: the sender writing its (new) page does not reach the receiver.
    snd.fill(SRC, 4096, 0x55);
    assert_eq!(rcv.read(x.addr, 4096), sent[..4096]);
    assert!(mgr.moved_pages() >= 8);
    assert!(snd.counters.remap_mmaps.load(Ordering::Relaxed) >= 2);
    // The receiver hands the pages back; the next exchange lands in the same
    // window pages, and what the sender gets back holds none of the first bytes.
    rcv.consume(1);
    snd.fill(SRC + 0x10_0000, 4 * 4096, 3);
    let second = snd.read(SRC + 0x10_0000, 4 * 4096);
    snd.post(msg(rcv.id, 1, SRC + 0x10_0000, 4 * 4096));
    mgr.drain(snd.id);
    let y = rcv.peek(0);
    assert_eq!(rcv.read(y.addr, 4 * 4096), second);
    assert_eq!(snd.read(SRC + 0x10_0000, 4 * 4096), vec![0u8; 4 * 4096]);
}

#[test]
fn huge_pages_remap_on_2mib_boundaries() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    // A small arrival first so the huge one cannot land at window page 0 by luck.
    snd.post(msg(rcv.id, 0, SRC, 1));
    mgr.drain(snd.id);
    snd.fill(0x40_0000, 2 << 20, 4);
    let sent = snd.read(0x40_0000, 2 << 20);
    snd.post(Message {
        huge: true,
        ..msg(rcv.id, 1, 0x40_0000, 2 << 20)
    });
    assert_eq!(mgr.drain(snd.id).delivered, 1);
    let x = rcv.peek(1);
    assert_eq!(x.addr % (2 << 20), 0);
    assert_eq!(rcv.read(x.addr, 2 << 20), sent);
    assert_eq!(
        snd.counters.remap_mmaps.load(Ordering::Relaxed),
        2,
        "one run each way"
    );
}

#[test]
fn a_receiver_forwards_what_it_holds_but_not_what_it_gave_back() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    let third = TestGuest::new(&mgr, "c");
    snd.fill(SRC, 8192, 7);
    let sent = snd.read(SRC, 8192);
    snd.post(msg(rcv.id, 1, SRC, 8192));
    mgr.drain(snd.id);
    let x = rcv.peek(0);
    let i = rcv.post(msg(third.id, 1, x.addr, 8192));
    mgr.drain(rcv.id);
    assert_eq!(rcv.status(i), SendStatus::Delivered);
    assert_eq!(third.read(third.peek(0).addr, 8192), sent);
    rcv.consume(1);
    let j = rcv.post(msg(third.id, 0, x.addr, 16));
    mgr.drain(rcv.id);
    assert_eq!(rcv.status(j), SendStatus::NotOwned);
    assert_eq!(rcv.counters.err_not_owned.load(Ordering::Relaxed), 1);
}

#[test]
fn hostile_descriptors_get_defined_errors_and_counters() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    let gone = TestGuest::new(&mgr, "gone");
    mgr.mark_exited(gone.id);
    let cases: Vec<(Message, SendStatus)> = vec![
        (msg(rcv.id, 0, RAM - 10, 11), SendStatus::OutsideRam),
        (msg(rcv.id, 1, RAM, 4096), SendStatus::OutsideRam),
        // The area's control pages and unallocated window are not the sender's.
        (msg(rcv.id, 0, area::VMQ, 64), SendStatus::OutsideRam),
        (
            msg(rcv.id, 0, area::VMQ + vmq::WINDOW, 64),
            SendStatus::NotOwned,
        ),
        (msg(rcv.id, 0, 0xFEE0_0000, 4), SendStatus::OutsideRam),
        (msg(rcv.id, 0, u64::MAX - 4, 4), SendStatus::OutsideRam),
        (msg(77, 0, SRC, 8), SendStatus::NoSuchVm),
        (msg(gone.id, 0, SRC, 8), SendStatus::VmExited),
        (msg(snd.id, 0, SRC, 8), SendStatus::BadDescriptor),
        (
            Message {
                policy: 9,
                ..msg(rcv.id, 0, SRC, 8)
            },
            SendStatus::BadDescriptor,
        ),
        (msg(rcv.id, 1, SRC + 1, 8), SendStatus::BadDescriptor),
        (msg(rcv.id, 0, SRC, 0), SendStatus::BadDescriptor),
    ];
    for (i, (mm, want)) in cases.iter().enumerate() {
        let k = snd.post(*mm);
        let d = mgr.drain(snd.id);
        assert_eq!(
            d,
            Drained {
                delivered: 0,
                failed: 1
            },
            "case {i}"
        );
        assert_eq!(snd.status(k), *want, "case {i}: {mm:?}");
    }
    let ctr = &snd.counters;
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    assert_eq!(g(&ctr.err_outside_ram), 5);
    assert_eq!(g(&ctr.err_not_owned), 1);
    assert_eq!(g(&ctr.err_no_such_vm), 1);
    assert_eq!(g(&ctr.err_vm_exited), 1);
    assert_eq!(g(&ctr.err_bad_descriptor), 4);
    assert_eq!(rcv.inbox_len(), 0, "nothing reached the destination");
    assert_eq!(rcv.notified.load(Ordering::Relaxed), 0);
}

#[test]
fn a_full_inbox_refuses_and_recovers() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    for _ in 0..RING_ENTRIES {
        snd.post(msg(rcv.id, 0, SRC, 64));
        mgr.drain(snd.id);
    }
    let k = snd.post(msg(rcv.id, 0, SRC, 64));
    mgr.drain(snd.id);
    assert_eq!(snd.status(k), SendStatus::QueueFull);
    assert_eq!(snd.counters.err_queue_full.load(Ordering::Relaxed), 1);
    assert_eq!(rcv.inbox_len(), RING_ENTRIES);
    // A full destination does not hold up messages to others.
    let other = TestGuest::new(&mgr, "other");
    let k1 = snd.post(msg(rcv.id, 0, SRC, 64));
    let k2 = snd.post(msg(other.id, 0, SRC, 64));
    mgr.drain(snd.id);
    assert_eq!(snd.status(k1), SendStatus::QueueFull);
    assert_eq!(snd.status(k2), SendStatus::Delivered);
    rcv.consume(1);
    let k = snd.post(msg(rcv.id, 0, SRC, 64));
    mgr.drain(snd.id);
    assert_eq!(snd.status(k), SendStatus::Delivered);
    // HOLD: a full destination leaves the message pending for a later exit.
    let held = Message {
        flags: Message::HOLD,
        ..msg(rcv.id, 0, SRC, 64)
    };
    let k1 = snd.post(held);
    let k2 = snd.post(msg(other.id, 0, SRC, 64));
    assert_eq!(mgr.drain(snd.id), Drained::default());
    assert_eq!(
        (snd.status(k1), snd.status(k2)),
        (SendStatus::Pending, SendStatus::Pending)
    );
    assert!(Manager::outbox_pending(snd.area));
    assert_eq!(snd.counters.held.load(Ordering::Relaxed), 1);
    rcv.consume(1);
    assert_eq!(
        mgr.drain(snd.id),
        Drained {
            delivered: 2,
            failed: 0
        }
    );
    assert_eq!(snd.status(k1), SendStatus::Delivered);
}

#[test]
fn a_full_window_refuses() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    // 32 huge pages fill the 64 MiB window.
    let huge = |addr| Message {
        huge: true,
        ..msg(rcv.id, 0, addr, 2 << 20)
    };
    for _ in 0..(vmq::WINDOW_SIZE >> 21) {
        snd.post(huge(SRC));
        assert_eq!(mgr.drain(snd.id).delivered, 1);
    }
    let k = snd.post(huge(SRC));
    mgr.drain(snd.id);
    assert_eq!(snd.status(k), SendStatus::QueueFull);
}

#[test]
fn bogus_ring_counters_are_counted_not_followed() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    snd.ctr(vmq::OUTBOX + RING_PRODUCED)
        .store(RING_ENTRIES + 5, Ordering::Release);
    assert_eq!(mgr.drain(snd.id), Drained::default());
    assert_eq!(snd.counters.bad_ring.load(Ordering::Relaxed), 1);
    // A receiver claiming to have consumed more than arrived gets nothing new.
    snd.ctr(vmq::OUTBOX + RING_PRODUCED)
        .store(0, Ordering::Release);
    rcv.ctr(vmq::INBOX + RING_CONSUMED)
        .store(3, Ordering::Release);
    let k = snd.post(msg(rcv.id, 0, SRC, 8));
    mgr.drain(snd.id);
    assert_eq!(snd.status(k), SendStatus::QueueFull);
    assert_eq!(rcv.counters.bad_ring.load(Ordering::Relaxed), 1);
}

#[test]
fn outbox_pending_sees_only_unsent_messages() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    assert!(!Manager::outbox_pending(snd.area));
    snd.post(msg(rcv.id, 0, SRC, 8));
    assert!(Manager::outbox_pending(snd.area));
    mgr.drain(snd.id);
    assert!(!Manager::outbox_pending(snd.area));
}

#[test]
fn the_doorbell_worker_drains_when_its_eventfd_is_written() {
    let mgr = Arc::new(Manager::new());
    let snd = TestGuest::new(&mgr, "snd");
    let rcv = TestGuest::new(&mgr, "rcv");
    let worker = super::DoorbellWorker::start(mgr.clone(), snd.id).unwrap();
    snd.fill(SRC, 4096, 2);
    let k = snd.post(Message {
        policy: 2,
        ..msg(rcv.id, 0, SRC, 4096)
    });
    // What the M1 monitor does for an event naming the VMQ device.
    worker.fd.write(1).unwrap();
    let t0 = std::time::Instant::now();
    while snd.status(k) == SendStatus::Pending && t0.elapsed() < std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(snd.status(k), SendStatus::Delivered);
    assert_eq!(snd.counters.sent_doorbell.load(Ordering::Relaxed), 1);
    assert_eq!(rcv.read(rcv.peek(0).addr, 4096), snd.read(SRC, 4096));
    drop(worker);
}
