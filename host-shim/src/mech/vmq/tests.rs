//! The manager on plain memfd memory (no KVM): what guests see in their areas.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use para_abi::layout::{PARA_REGION_BASE, area};
use para_abi::vmq::{
    self, Arrival, DirRecord, ENTRY_SIZE, Header, Message, RING_CONSUMED, RING_ENTRIES,
    RING_PRODUCED, SendStatus,
};
use vm_memory::{Bytes, GuestAddress};

use super::manager::{Drained, Manager, VmqCounters};
use super::pages::{Kernel, Limits, Sys};
use super::{Area, endpoint_memory};
use crate::kvm::memory::{self, GuestMem};

const RAM: u64 = 8 << 20;

struct TestGuest {
    id: u32,
    ram: GuestMem,
    ram_len: u64,
    area: usize,
    counters: Arc<VmqCounters>,
    notified: Arc<AtomicU64>,
}

impl TestGuest {
    fn new(m: &Manager, name: &str) -> Self {
        Self::with_ram(m, name, RAM)
    }

    fn with_ram(m: &Manager, name: &str, bytes: u64) -> Self {
        let ram = memory::create(name, bytes).unwrap();
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
            ram_len: bytes,
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
    assert!(mgr.with_backings(|b| b.consistent()));
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
    assert!(mgr.with_backings(|b| b.consistent()));
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
fn the_monitor_drains_a_doorbell_event_itself() {
    let mgr = Arc::new(Manager::new());
    let snd = TestGuest::new(&mgr, "snd");
    let rcv = TestGuest::new(&mgr, "rcv");
    let (target, worker) = super::doorbell_target(&mgr, snd.id).unwrap();
    let run = target.inline.clone().unwrap();
    snd.fill(SRC, 4096, 5);
    let k = snd.post(Message {
        policy: 2,
        ..msg(rcv.id, 0, SRC, 4096)
    });
    // What the M1 monitor does for an event naming the VMQ device's queue 0:
    // the drain runs on its own thread, no worker woken.
    assert!(run(0));
    assert_eq!(snd.status(k), SendStatus::Delivered);
    assert_eq!(rcv.read(rcv.peek(0).addr, 4096), snd.read(SRC, 4096));
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    assert_eq!(
        (
            g(&snd.counters.delivered_at_monitor),
            g(&snd.counters.delivered_at_worker)
        ),
        (1, 0)
    );
    // Another queue number is not the outbox's: refused (the caller counts it).
    assert!(!run(1));
    drop(worker);
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

/// The real system calls, except the ones a test makes fail: `maps` lists the
/// `mmap` calls (counted from 0) that fail with ENOMEM, as at
/// `vm.max_map_count`, without doing anything; `punches` the same for punches.
struct Faulty {
    maps: Vec<usize>,
    punches: Vec<usize>,
    seen: (usize, usize),
}

impl Faulty {
    fn maps(maps: &[usize]) -> Box<dyn Sys> {
        Box::new(Self {
            maps: maps.to_vec(),
            punches: Vec::new(),
            seen: (0, 0),
        })
    }
}

impl Sys for Faulty {
    fn map(
        &mut self,
        addr: usize,
        len: u64,
        file: &std::fs::File,
        offset: u64,
    ) -> std::io::Result<()> {
        self.seen.0 += 1;
        if self.maps.contains(&(self.seen.0 - 1)) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Kernel::default().map(addr, len, file, offset)
    }
    fn punch(&mut self, file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
        self.seen.1 += 1;
        if self.punches.contains(&(self.seen.1 - 1)) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Kernel::default().punch(file, offset, len)
    }
}

/// Guest-physical address of receive-window page `page`.
fn window(page: u64) -> u64 {
    area::VMQ + vmq::WINDOW + page * 4096
}

impl TestGuest {
    fn write_window(&self, page: u64, bytes: &[u8]) {
        // SAFETY: inside the mapped area's window.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.area + (vmq::WINDOW + page * 4096) as usize) as *mut u8,
                bytes.len(),
            );
        }
    }

    fn ram_base(&self) -> usize {
        vm_memory::GuestMemoryBackend::get_host_address(&self.ram, GuestAddress(0)).unwrap()
            as usize
    }
}

/// Sender and receiver for a two-page remap whose steps fail as `sys` says:
/// the receiver's window slot (pages 0 and 1, where the first arrival lands)
/// and the sender's range hold known bytes beforehand.
fn failed_remap(sys: Box<dyn Sys>) -> (Manager, TestGuest, TestGuest, Vec<u8>, Vec<u8>) {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    snd.fill(SRC, 8192, 0x21);
    let mine = snd.read(SRC, 8192);
    let old: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 ^ 0xC3).collect();
    rcv.write_window(0, &old);
    mgr.with_backings(|b| b.set_sys(sys));
    let k = snd.post(msg(rcv.id, 1, SRC, 8192));
    assert_eq!(
        mgr.drain(snd.id),
        Drained {
            delivered: 0,
            failed: 1
        }
    );
    assert_eq!(snd.status(k), SendStatus::QueueFull);
    (mgr, snd, rcv, mine, old)
}

/// Nothing of a refused exchange is visible: each guest reads its own bytes,
/// writes by one do not reach the other, and the ledger is whole.
fn assert_untouched(mgr: &Manager, snd: &TestGuest, rcv: &TestGuest, old: &[u8]) {
    assert_eq!(rcv.inbox_len(), 0, "no arrival announced");
    assert_eq!(rcv.read(window(0), 8192), old, "the slot keeps its bytes");
    snd.fill(SRC, 8192, 0x77);
    assert_eq!(
        rcv.read(window(0), 8192),
        old,
        "the sender's page is not the slot's"
    );
    rcv.write_window(0, &[0xEE; 8192]);
    assert_ne!(
        snd.read(SRC, 8192),
        vec![0xEE; 8192],
        "the slot is not the sender's page"
    );
    assert!(
        mgr.with_backings(|b| b.consistent()),
        "a file page at two places"
    );
    assert_eq!(snd.counters.err_remap_failed.load(Ordering::Relaxed), 1);
    assert_eq!(snd.counters.err_queue_full.load(Ordering::Relaxed), 0);
    assert_eq!(rcv.counters.received.load(Ordering::Relaxed), 0);
}

#[test]
fn a_remap_whose_first_mmap_fails_changes_nothing() {
    // mmap 0: pool pages over the sender's range.
    let (mgr, snd, rcv, mine, old) = failed_remap(Faulty::maps(&[0]));
    assert_eq!(snd.read(SRC, 8192), mine, "the sender keeps its pages");
    assert_eq!(mgr.moved_pages(), 0);
    assert_untouched(&mgr, &snd, &rcv, &old);
}

#[test]
fn a_remap_whose_second_mmap_fails_is_undone() {
    // mmap 1: the sender's pages over the slot; mmap 2 puts the sender's pages back.
    let (mgr, snd, rcv, mine, old) = failed_remap(Faulty::maps(&[1]));
    assert_eq!(snd.read(SRC, 8192), mine, "the sender keeps its pages");
    assert_eq!(mgr.moved_pages(), 0);
    assert_eq!(mgr.with_backings(|b| b.fragments(snd.id as usize)), (0, 0));
    assert_untouched(&mgr, &snd, &rcv, &old);
    // The slot was freed and nothing is out of place: the same message goes
    // through once mmap works again.
    mgr.with_backings(|b| b.set_sys(Box::new(Kernel::default())));
    snd.fill(SRC, 8192, 0x21);
    let k = snd.post(msg(rcv.id, 1, SRC, 8192));
    mgr.drain(snd.id);
    assert_eq!(snd.status(k), SendStatus::Delivered);
    assert_eq!(rcv.read(rcv.peek(0).addr, 8192), mine);
    assert_eq!(snd.read(SRC, 8192), vec![0; 8192]);
}

#[test]
fn a_remap_whose_undo_fails_too_shares_no_page() {
    // The slot mmap fails, then so does putting the sender's pages back: the
    // sender is left with zeroed pages (its message lost, and refused), never
    // with a page the receiver shows.
    let (mgr, snd, rcv, _, old) = failed_remap(Faulty::maps(&[1, 2]));
    assert_eq!(snd.read(SRC, 8192), vec![0; 8192]);
    assert_untouched(&mgr, &snd, &rcv, &old);
}

#[test]
fn a_failed_punch_keeps_the_pages_out_of_the_pool_until_it_works() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    rcv.write_window(0, &[0x5A; 8192]);
    mgr.with_backings(|b| {
        b.set_sys(Box::new(Faulty {
            maps: Vec::new(),
            punches: vec![0],
            seen: (0, 0),
        }));
    });
    snd.fill(SRC, 8192, 3);
    let k = snd.post(msg(rcv.id, 1, SRC, 8192));
    mgr.drain(snd.id);
    // Both mappings were made: the exchange stands. The slot's old pages are
    // mapped nowhere and wait, unzeroed, outside the pool.
    assert_eq!(snd.status(k), SendStatus::Delivered);
    assert_eq!(mgr.with_backings(|b| b.pool_pages()), 512 - 2);
    assert!(mgr.with_backings(|b| b.consistent()));
    // The next exchange zeroes them first; what the sender receives is zero.
    for i in 0..300u64 {
        let at = SRC + 0x10_0000 + (i % 4) * 8192;
        snd.post(msg(rcv.id, 1, at, 8192));
        mgr.drain(snd.id);
        rcv.consume(1);
        assert_eq!(snd.read(at, 8192), vec![0; 8192], "send {i}");
    }
    assert_eq!(mgr.with_backings(|b| b.pool_pages()), 512);
    assert!(mgr.with_backings(|b| b.consistent()));
}

/// Host mappings (VMAs) inside `base..base+len`, as the kernel lists them.
fn vmas_in(base: usize, len: usize) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (range, _) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a >= base && b <= base + len)
        .count()
}

fn assert_ledger_matches_kernel(mgr: &Manager, g: &TestGuest) {
    for (base, len) in [
        (g.ram_base(), g.ram_len as usize),
        (g.area, vmq::AREA_SIZE as usize),
    ] {
        assert_eq!(
            vmas_in(base, len),
            1 + mgr.with_backings(|b| b.fragments_in(base, len)),
            "VMAs at {base:#x}"
        );
    }
}

#[test]
fn streaming_from_one_buffer_keeps_the_mappings_whole() {
    // The ping-pong and pipeline pattern: the same buffer again and again. Pages
    // handed out and in follow each other in their files, so the kernel merges
    // them and the VMA count stays flat.
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    for _ in 0..2000 {
        snd.post(msg(rcv.id, 1, SRC, 8192));
        assert_eq!(mgr.drain(snd.id).delivered, 1);
        rcv.consume(1);
    }
    let (total, own) = mgr.with_backings(|b| b.fragments(snd.id as usize));
    assert!(total <= 8 && own == total, "{total} fragments");
    assert!(mgr.with_backings(|b| b.consistent()));
    assert_ledger_matches_kernel(&mgr, &snd);
    assert_ledger_matches_kernel(&mgr, &rcv);
}

#[test]
fn remaps_beyond_the_senders_fragment_share_are_refused_before_anything_moves() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    let third = TestGuest::new(&mgr, "c");
    let limits = Limits {
        max_map_count: 600,
        total: 300,
        per_sender: 100,
    };
    mgr.with_backings(|b| b.limits = limits);
    // Every other page of a range: each exchange splits both guests' mappings.
    let mut sent = 0u64;
    let refused = loop {
        let at = SRC + sent * 8192;
        snd.fill(at, 4096, sent as u8);
        let k = snd.post(msg(rcv.id, 1, at, 4096));
        mgr.drain(snd.id);
        if snd.status(k) != SendStatus::Delivered {
            break (k, at);
        }
        rcv.consume(1);
        sent += 1;
        assert!(sent < 1000, "never refused");
    };
    assert_eq!(snd.status(refused.0), SendStatus::QueueFull);
    assert_eq!(snd.counters.err_remap_limit.load(Ordering::Relaxed), 1);
    assert_eq!(snd.counters.err_remap_failed.load(Ordering::Relaxed), 0);
    let own = snd.counters.remap_fragments.load(Ordering::Relaxed);
    assert!(own <= 100 && own > 90, "{own} fragments held");
    assert_eq!(
        mgr.with_backings(|b| b.fragments(snd.id as usize)).1 as u64,
        own
    );
    // Refused before anything moved: the page is still the sender's own.
    assert_eq!(snd.read(refused.1, 4096), {
        let t = TestGuest::new(&Manager::new(), "t");
        t.fill(0, 4096, sent as u8);
        t.read(0, 4096)
    });
    assert!(mgr.with_backings(|b| b.consistent()));
    assert_ledger_matches_kernel(&mgr, &snd);
    assert_ledger_matches_kernel(&mgr, &rcv);
    // The bound is the sender's: another guest still remaps to the same receiver.
    third.fill(SRC, 4096, 9);
    let k = third.post(msg(rcv.id, 1, SRC, 4096));
    mgr.drain(third.id);
    assert_eq!(third.status(k), SendStatus::Delivered);
    // And the sender itself may still copy.
    let k = snd.post(msg(rcv.id, 0, SRC, 4096));
    mgr.drain(snd.id);
    assert_eq!(snd.status(k), SendStatus::Delivered);
    assert_eq!(
        snd.counters.report(snd.id).errors["remap_limit"],
        1,
        "in the stats JSON under its own reason"
    );
}

#[test]
fn the_fragment_share_comes_from_vm_max_map_count_and_the_guest_count() {
    let mgr = Manager::new();
    let a = TestGuest::new(&mgr, "a");
    let _b = TestGuest::new(&mgr, "b");
    let max = Limits::system_max_map_count();
    assert_eq!(
        mgr.with_backings(|b| b.limits),
        Limits {
            max_map_count: max,
            total: max / 2,
            per_sender: max / 4
        }
    );
    assert_eq!(
        a.counters.report(a.id).remap_fragment_limit,
        (max / 4) as u64
    );
}

#[test]
fn a_refused_remap_is_held_like_a_full_queue_and_keeps_the_stream_in_order() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    mgr.with_backings(|b| b.set_sys(Faulty::maps(&[1])));
    // Without HOLD: refused, and a later message to the same receiver in the
    // same drain is refused too, so a resend from the first refusal keeps order.
    let k1 = snd.post(msg(rcv.id, 1, SRC, 4096));
    let k2 = snd.post(msg(rcv.id, 0, SRC, 64));
    mgr.drain(snd.id);
    assert_eq!(
        (snd.status(k1), snd.status(k2)),
        (SendStatus::QueueFull, SendStatus::QueueFull)
    );
    assert_eq!(rcv.inbox_len(), 0);
    // With HOLD: it waits for a later exit, counted under its reason.
    mgr.with_backings(|b| b.set_sys(Faulty::maps(&[1])));
    let k = snd.post(Message {
        flags: Message::HOLD,
        ..msg(rcv.id, 1, SRC, 4096)
    });
    assert_eq!(mgr.drain(snd.id), Drained::default());
    assert_eq!(snd.status(k), SendStatus::Pending);
    assert_eq!(snd.counters.err_remap_failed.load(Ordering::Relaxed), 2);
    assert_eq!(snd.counters.held.load(Ordering::Relaxed), 1);
    mgr.with_backings(|b| b.set_sys(Box::new(Kernel::default())));
    assert_eq!(mgr.drain(snd.id).delivered, 1);
    assert_eq!(snd.status(k), SendStatus::Delivered);
    assert!(mgr.with_backings(|b| b.consistent()));
}

#[test]
fn a_scattering_sender_meets_its_share_long_before_the_kernel_limit() {
    // The attack that once made mmap fail with ENOMEM: single pages from all
    // over the sender's RAM in random order, each leaving splits in both
    // guests' mappings. Under the real bound (three guests: a third of half of
    // vm.max_map_count each) it is refused by reason, never by the kernel.
    // A fixed order would not do: the pool hands pages back in send order, so
    // a repeated pattern coalesces by itself. The receiver consumes at once,
    // so its window slot is reused every time (lowest-first allocation): the
    // splits are the sender's own, over 64 MiB of RAM.
    let mgr = Manager::new();
    let snd = TestGuest::with_ram(&mgr, "a", 64 << 20);
    let rcv = TestGuest::new(&mgr, "b");
    let _third = TestGuest::new(&mgr, "c");
    let limits = mgr.with_backings(|b| b.limits);
    let mut sent = 0u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    loop {
        // xorshift64: a different order every round, so nothing coalesces.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = 256 + x % 16_000;
        let k = snd.post(msg(rcv.id, 1, page * 4096, 4096));
        mgr.drain(snd.id);
        if snd.status(k) != SendStatus::Delivered {
            break;
        }
        rcv.consume(1);
        sent += 1;
        assert!(sent < 40_000, "never refused");
    }
    assert_eq!(snd.counters.err_remap_limit.load(Ordering::Relaxed), 1);
    assert_eq!(snd.counters.err_remap_failed.load(Ordering::Relaxed), 0);
    let (total, own) = mgr.with_backings(|b| b.fragments(snd.id as usize));
    assert!(
        own <= limits.per_sender && own + 8 > limits.per_sender,
        "own {own} total {total} limits {limits:?} sent {sent}"
    );
    assert!(total <= limits.total);
    assert_ledger_matches_kernel(&mgr, &snd);
    assert_ledger_matches_kernel(&mgr, &rcv);
    assert!(mgr.with_backings(|b| b.consistent()));
}

#[test]
fn hostile_remaps_are_refused_counted_and_map_nothing() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    snd.fill(SRC, 4096, 7);
    let before = snd.read(SRC, 4096);
    let huge = |addr, len| Message {
        huge: true,
        ..msg(rcv.id, 1, addr, len)
    };
    let cases: Vec<(Message, SendStatus)> = vec![
        // Bogus page numbers: far beyond RAM, wrapping, the last page + 1.
        (
            msg(rcv.id, 1, 0x7FFF_FFFF_F000, 4096),
            SendStatus::OutsideRam,
        ),
        (msg(rcv.id, 1, !0xFFF, 8192), SendStatus::OutsideRam),
        (msg(rcv.id, 1, RAM - 4096, 8192), SendStatus::OutsideRam),
        (huge(RAM, 2 << 20), SendStatus::OutsideRam),
        // Its para region, its own VM-queue control pages, the kick page.
        (
            msg(rcv.id, 1, PARA_REGION_BASE, 4096),
            SendStatus::OutsideRam,
        ),
        (
            msg(rcv.id, 1, area::VMQ + vmq::OUTBOX - 0x3000, 4096),
            SendStatus::OutsideRam,
        ),
        (
            msg(rcv.id, 1, area::VMQ + vmq::KICK, 4096),
            SendStatus::OutsideRam,
        ),
        // Huge counts and misaligned huge pages.
        (msg(rcv.id, 1, SRC, u32::MAX), SendStatus::BadDescriptor),
        (
            msg(rcv.id, 1, SRC, vmq::MAX_MESSAGE + 4096),
            SendStatus::BadDescriptor,
        ),
        (huge(4096, 2 << 20), SendStatus::BadDescriptor),
        // Itself, and destinations that name nobody.
        (msg(snd.id, 1, SRC, 4096), SendStatus::BadDescriptor),
        (msg(31, 1, SRC, 4096), SendStatus::NoSuchVm),
        (msg(u32::MAX, 1, SRC, 4096), SendStatus::NoSuchVm),
    ];
    for (i, (m, want)) in cases.iter().enumerate() {
        let k = snd.post(*m);
        assert_eq!(mgr.drain(snd.id).failed, 1, "case {i}");
        assert_eq!(snd.status(k), *want, "case {i}: {m:?}");
    }
    let c = &snd.counters;
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    assert_eq!(g(&c.err_outside_ram), 7);
    assert_eq!(g(&c.err_bad_descriptor), 4);
    assert_eq!(g(&c.err_no_such_vm), 2);
    // Nothing was mapped anywhere: no page moved, no mmap made, the sender
    // still sees its bytes and the receiver got nothing.
    assert_eq!(mgr.moved_pages(), 0);
    assert_eq!(g(&c.remap_mmaps), 0);
    assert!(snd.read(SRC, 4096) == before, "the sender's page changed");
    assert_eq!(rcv.inbox_len(), 0);
    assert_eq!(g(&rcv.counters.window_fresh_pages), 0);
    assert!(mgr.with_backings(|b| b.consistent()));
}

fn kick(wait: bool, full: bool, done: bool, seen: u16, max_us: u32) -> vmq::Kick {
    vmq::Kick {
        wait,
        full,
        done: if done {
            vmq::UntilDone::Yes
        } else {
            vmq::UntilDone::No
        },
        seen,
        max_us,
    }
}

/// A thread blocked in a kick-page wait of guest `id` with nothing seen,
/// returning whether an arrival ended it. A wait lasts at most WAIT_MAX
/// (10 ms): on a loaded host the waiter may time out before this thread sees
/// it blocked, so it starts again then.
fn blocked_waiter(mgr: &Arc<Manager>, id: u32) -> std::thread::JoinHandle<bool> {
    loop {
        let m2 = mgr.clone();
        let w = std::thread::spawn(move || m2.wait(id, &kick(true, false, false, 0, 0)));
        while !mgr.is_waiting(id) && !w.is_finished() {
            std::thread::yield_now();
        }
        if mgr.is_waiting(id) {
            return w;
        }
        assert!(!w.join().unwrap(), "nothing had arrived");
    }
}

#[test]
fn a_wait_delivers_lazy_messages_and_wakes_a_waiting_receiver_without_an_interrupt() {
    let mgr = Arc::new(Manager::new());
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    let waiter = blocked_waiter(&mgr, rcv.id);
    // A lazy message: it leaves with the sender's own wait, no flush.
    snd.fill(SRC, 64, 3);
    let k = snd.post(Message {
        policy: 1,
        ..msg(rcv.id, 0, SRC, 64)
    });
    // The sender waits for its outbox to be done: returns at once.
    assert!(!mgr.wait(snd.id, &kick(true, false, true, 0, 0)));
    assert_eq!(snd.status(k), SendStatus::Delivered);
    assert!(waiter.join().unwrap(), "the receiver woke for its arrival");
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    assert_eq!(g(&snd.counters.delivered_at_wait), 1);
    assert_eq!(g(&snd.counters.waits), 1);
    assert_eq!(g(&rcv.counters.waits_woken), 1);
    // The blocked receiver was woken directly: no interrupt on top.
    assert_eq!(rcv.notified.load(Ordering::Relaxed), 0);
    assert_eq!(g(&rcv.counters.notifications), 1);
    // Not waiting any more: the next arrival comes as an interrupt again.
    snd.post(Message {
        policy: 1,
        ..msg(rcv.id, 0, SRC, 64)
    });
    rcv.consume(1);
    mgr.drain(snd.id);
    assert_eq!(rcv.notified.load(Ordering::Relaxed), 1);
}

#[test]
fn a_wait_returns_for_more_than_it_has_seen_or_at_its_deadline() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    // Nothing comes: the deadline (2 ms) ends it, not an arrival.
    assert!(!mgr.wait(rcv.id, &kick(true, false, false, 0, 2000)));
    snd.post(msg(rcv.id, 0, SRC, 64));
    mgr.drain(snd.id);
    // One arrival it has already seen does not end a wait; a bogus "seen"
    // larger than the inbox does not either, and nothing breaks.
    assert!(!mgr.wait(rcv.id, &kick(true, false, false, 1, 1000)));
    assert!(mgr.wait(rcv.id, &kick(true, false, false, 0, 1000)));
    assert!(!mgr.wait(rcv.id, &kick(true, false, false, 200, 1000)));
    assert_eq!(rcv.counters.waits.load(Ordering::Relaxed), 4);
    assert_eq!(rcv.counters.waits_woken.load(Ordering::Relaxed), 1);
}

#[test]
fn the_kick_page_flushes_counts_why_and_refuses_what_is_not_a_kick() {
    use crate::platform::MmioDevice;
    let mgr = Arc::new(Manager::new());
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    let page = super::KickPage {
        manager: mgr.clone(),
        id: snd.id,
        counters: snd.counters.clone(),
        log: crate::loglimit::LogLimit::default(),
    };
    let at = area::VMQ + vmq::KICK;
    let store = |k: &vmq::Kick| page.mmio_write(at, &k.encode().to_le_bytes());
    snd.post(msg(rcv.id, 0, SRC, 64));
    assert!(store(&kick(false, false, false, 0, 0)));
    snd.post(msg(rcv.id, 0, SRC, 64));
    assert!(store(&kick(false, true, false, 0, 0)));
    assert_eq!(rcv.inbox_len(), 2);
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    assert_eq!(
        (g(&snd.counters.kick_flushes), g(&snd.counters.full_flushes)),
        (1, 1)
    );
    assert_eq!(g(&snd.counters.delivered_at_flush), 2);
    // Reads, short stores: refused and counted; addresses beyond the page
    // are not its own.
    let mut b = [0u8; 8];
    assert!(page.mmio_read(at, &mut b));
    assert!(page.mmio_write(at + 8, &[1, 2, 3, 4]));
    assert!(!page.mmio_write(at + vmq::KICK_SIZE, &[0; 8]));
    assert!(!page.mmio_write(at - 8, &[0; 8]));
    assert_eq!(g(&snd.counters.bad_kicks), 2);
    assert_eq!(rcv.inbox_len(), 2);
}

#[test]
fn window_pages_are_reused_lowest_first() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    for _ in 0..100 {
        snd.post(msg(rcv.id, 0, SRC, 4096));
        mgr.drain(snd.id);
        assert_eq!(rcv.peek(0).addr, area::VMQ + vmq::WINDOW);
        rcv.consume(1);
    }
    // One page of the window was ever handed out: the guest faults once.
    assert_eq!(rcv.counters.window_fresh_pages.load(Ordering::Relaxed), 1);
}

#[test]
fn a_quiet_receiver_gets_no_notification_while_running_and_still_wakes_from_a_wait() {
    let mgr = Arc::new(Manager::new());
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    rcv.ctr(vmq::INBOX_QUIET).store(1, Ordering::Release);
    // Running (not in a wait): the empty → non-empty edge sends nothing.
    snd.post(msg(rcv.id, 0, SRC, 64));
    mgr.drain(snd.id);
    assert_eq!(rcv.inbox_len(), 1);
    assert_eq!(rcv.notified.load(Ordering::Relaxed), 0);
    assert_eq!(
        (
            g(&rcv.counters.notifications),
            g(&rcv.counters.notifications_quiet)
        ),
        (1, 1)
    );
    // Its next wait sees the arrival at once: nothing was lost.
    assert!(mgr.wait(rcv.id, &kick(true, false, false, 0, 1000)));
    rcv.consume(1);
    // Blocked in a wait, it is woken by the drain as before.
    let waiter = blocked_waiter(&mgr, rcv.id);
    snd.post(msg(rcv.id, 0, SRC, 64));
    mgr.drain(snd.id);
    assert!(
        waiter.join().unwrap(),
        "the quiet receiver woke for its arrival"
    );
    assert_eq!(rcv.notified.load(Ordering::Relaxed), 0);
    // Quiet off again (a guest about to halt): the edge notifies.
    rcv.consume(1);
    rcv.ctr(vmq::INBOX_QUIET).store(0, Ordering::Release);
    snd.post(msg(rcv.id, 0, SRC, 64));
    mgr.drain(snd.id);
    assert_eq!(rcv.notified.load(Ordering::Relaxed), 1);
}

#[test]
fn a_flush_that_waits_delivers_then_waits_and_never_sleeps_behind_its_own_held_message() {
    let mgr = Manager::new();
    let snd = TestGuest::new(&mgr, "a");
    let rcv = TestGuest::new(&mgr, "b");
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let flush_wait = |seen: u16, max_us: u32| vmq::Kick {
        done: vmq::UntilDone::IfHeld,
        ..kick(true, false, false, seen, max_us)
    };
    // Delivered by the exit; nothing arrives for the sender: it waits to
    // its deadline (done alone does not end it: its message went).
    let i = snd.post(msg(rcv.id, 0, SRC, 64));
    let t = std::time::Instant::now();
    assert!(!mgr.wait(snd.id, &flush_wait(0, 3000)));
    assert!(t.elapsed() >= std::time::Duration::from_millis(3));
    assert_eq!(snd.status(i), SendStatus::Delivered);
    assert_eq!(g(&snd.counters.delivered_at_wait), 1);
    assert_eq!(
        (g(&snd.counters.flush_waits), g(&snd.counters.waits)),
        (1, 0)
    );
    // Something for the sender already there: it returns at once.
    rcv.post(msg(snd.id, 0, SRC, 64));
    mgr.drain(rcv.id);
    let i = snd.post(msg(rcv.id, 0, SRC, 64));
    assert!(mgr.wait(snd.id, &flush_wait(0, 0)));
    assert_eq!(snd.status(i), SendStatus::Delivered);
    // Held back at a full receiver that stays full: not done, so the wait
    // runs to its deadline with the message still pending.
    snd.consume(snd.inbox_len());
    rcv.consume(rcv.inbox_len());
    for _ in 0..RING_ENTRIES {
        snd.post(msg(rcv.id, 0, SRC, 64));
    }
    mgr.drain(snd.id);
    assert_eq!(rcv.inbox_len(), RING_ENTRIES);
    let hold = |n| Message {
        flags: Message::HOLD,
        tag: n,
        ..msg(rcv.id, 0, SRC, 64)
    };
    let i = snd.post(hold(0));
    assert!(!mgr.wait(snd.id, &flush_wait(0, 2000)));
    assert_eq!(snd.status(i), SendStatus::Pending);
    rcv.consume(1);
    mgr.drain(snd.id);
    assert_eq!(snd.status(i), SendStatus::Delivered);
    // Held, and the receiver makes room while the sender waits: the retry
    // delivers it and the wait ends then, well before its 10 ms deadline
    // (without `held_done` it would sleep to that deadline behind its own
    // message). Tried a few times: a loaded host may stall a test thread.
    let mgr = Arc::new(mgr);
    let quick = (1..=5).any(|n| {
        let (m2, sid) = (mgr.clone(), snd.id);
        let rcv_area = rcv.area;
        let freer = std::thread::spawn(move || {
            while !m2.is_waiting(sid) {
                std::thread::yield_now();
            }
            // SAFETY: the receiver's area stays mapped by the manager.
            let c = unsafe {
                &*((rcv_area + (vmq::INBOX + RING_CONSUMED) as usize) as *const AtomicU32)
            };
            c.fetch_add(1, Ordering::Release);
            std::time::Instant::now()
        });
        let j = snd.post(hold(n));
        assert!(!mgr.wait(snd.id, &flush_wait(0, 0)));
        let back = std::time::Instant::now();
        let room_at = freer.join().unwrap();
        assert_eq!(snd.status(j), SendStatus::Delivered);
        back.duration_since(room_at) < super::manager::WAIT_MAX / 2
    });
    assert!(quick, "a flush-wait slept behind its own held message");
}
