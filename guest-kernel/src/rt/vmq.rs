//! VM queues (mechanism M5): send byte ranges to other guests by
//! name, receive theirs, all in ring 3.
//!
//! The shim's VM-queue area (`para_abi::vmq`) holds this guest's outbox (we
//! produce, the shim consumes and writes a status back), its inbox (the shim
//! produces arrivals, we consume) and a receive window where arrivals' bytes
//! are. Posting is plain stores; what makes the shim deliver is an exit of this
//! guest: `flush` makes one at once (the immediate policy), the lazy policy
//! waits for any exit that comes. The inbox length is a plain read. Under QEMU
//! there is no area: [`open`] reports [`VmqError::Unavailable`].

use crate::abi::vector;
use crate::arch::BOOT;
use crate::rt::{irq, wait};
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use core::time::Duration;
use para_abi::discovery::{self, features};
use para_abi::layout::area;
use para_abi::vmq::{
    self, Arrival, DirRecord, ENTRY_SIZE, Header, Kick, Message, RING_CONSUMED, RING_ENTRIES,
    RING_PRODUCED, SendStatus, UntilDone,
};

pub use para_abi::vmq::{Policy, Transfer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmqError {
    /// Not under the Exitless shim, or it offers no VM queues.
    Unavailable,
    /// The area is not where or what this guest expects (says which).
    BadArea(&'static str),
}

impl fmt::Display for VmqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable => write!(
                f,
                "no VM queues here (not under the Exitless shim, or turned off)"
            ),
            Self::BadArea(why) => write!(f, "VM-queue area unusable: {why}"),
        }
    }
}

/// This guest's VM-queue area.
pub struct Vmq {
    base: usize,
    my_id: u32,
    /// Explicit flushes made (each one exit), and those of them made because
    /// the outbox was full.
    pub flushes: AtomicU64,
    pub full_flushes: AtomicU64,
    /// Kick-page waits made (each one exit, in place of a halt).
    pub waits: AtomicU64,
}

/// How long a sender held back by a full destination first sleeps between
/// flushes; each futile flush doubles it up to [`BACKOFF_MAX`]. A flush is an
/// exit (~30 µs here): a receiver that lags should not cost one per poll.
pub const BACKOFF: Duration = Duration::from_micros(50);
pub const BACKOFF_MAX: Duration = Duration::from_millis(1);

/// Exponential back-off between flushes that did not get a message through.
#[derive(Debug, Default)]
pub struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// Sleeps (not on the first call after a reset), then lengthens the next sleep.
    pub fn pause(&mut self) {
        if let Some(d) = self.next {
            wait::sleep(d);
            self.next = Some((d * 2).min(BACKOFF_MAX));
        } else {
            self.next = Some(BACKOFF);
        }
    }

    /// Progress was made: the next pause sleeps the shortest time. (Not
    /// none: a receiver that just made room for one message is usually still
    /// nearly full, and an immediate flush would mostly bounce.)
    pub fn reset(&mut self) {
        self.next = Some(BACKOFF);
    }
}

static VMQ: spin::Once<Result<Vmq, VmqError>> = spin::Once::new();

fn on_arrival(_: u8) {
    // The wake-up is the point; `wait` re-reads the inbox.
}

fn on_arrival_upcall(_: super::upcall::Class, _: u32) {
    // As `on_arrival`: the upcall woke us; `wait` re-reads the inbox.
}

/// Opens the area once (ring 3); every later call returns the same result.
pub fn open() -> Result<&'static Vmq, VmqError> {
    VMQ.call_once(open_area).as_ref().map_err(|e| *e)
}

fn open_area() -> Result<Vmq, VmqError> {
    if BOOT.under_shim.load(Ordering::Relaxed) == 0 {
        return Err(VmqError::Unavailable);
    }
    let f = crate::arch::cpu::cpuid(discovery::LEAF_FEATURES, 0);
    if f.eax & features::VM_QUEUES == 0 {
        return Err(VmqError::Unavailable);
    }
    let l = crate::arch::cpu::cpuid(discovery::LEAF_VMQ, 0);
    let (gpa, size, version) = discovery::area_from_registers([l.eax, l.ebx, l.ecx, l.edx])
        .ok_or(VmqError::BadArea("the VMQ leaf is empty"))?;
    // Only the fixed area is mapped for ring 3 by the boot page tables.
    if gpa != area::VMQ || u64::from(size) < vmq::AREA_SIZE || version != vmq::VERSION {
        return Err(VmqError::BadArea("address, size or version"));
    }
    let q = Vmq {
        base: gpa as usize,
        my_id: 0,
        flushes: AtomicU64::new(0),
        full_flushes: AtomicU64::new(0),
        waits: AtomicU64::new(0),
    };
    let h = q.header();
    if h.magic != vmq::MAGIC || h.window != area::VMQ + vmq::WINDOW {
        return Err(VmqError::BadArea("header"));
    }
    irq::register(vector::VMQ_ARRIVAL, on_arrival);
    // Where the shim offers M3 upcalls it notifies arrivals as a `VmqArrival`
    // upcall to vCPU 0 (injected when its interrupt window opens) instead of
    // the MSI; the wake-up is what matters, so both paths end in `wait`.
    if super::upcall::init().is_ok() {
        super::upcall::register_upcall(super::upcall::Class::VmqArrival, on_arrival_upcall);
    }
    Ok(Vmq {
        my_id: h.my_id,
        ..q
    })
}

impl Vmq {
    fn ctr(&self, off: u64) -> &AtomicU32 {
        // SAFETY: ring counters (and `INBOX_QUIET`) are aligned u32s on the
        // rings' counter lines, which the boot page tables map for ring 3 and the shim keeps for the VM's life.
        unsafe { &*((self.base + off as usize) as *const AtomicU32) }
    }

    fn read(&self, off: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: inside the mapped area (callers pass area offsets of records).
            *b = unsafe { core::ptr::read_volatile((self.base + off as usize + i) as *const u8) };
        }
    }

    fn write(&self, off: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: as `read`.
            unsafe { core::ptr::write_volatile((self.base + off as usize + i) as *mut u8, b) };
        }
    }

    fn header(&self) -> Header {
        let mut b = [0u8; vmq::HEADER_SIZE];
        self.read(vmq::HEADER, &mut b);
        Header::decode(&b)
    }

    /// This guest's id in the directory.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.my_id
    }

    /// The directory record `i`, if there is one.
    #[must_use]
    pub fn record(&self, i: u32) -> Option<DirRecord> {
        if i >= self.header().dir_len.min(vmq::DIR_ENTRIES as u32) {
            return None;
        }
        let mut b = [0u8; vmq::DIR_RECORD_SIZE];
        self.read(
            vmq::DIRECTORY + u64::from(i) * vmq::DIR_RECORD_SIZE as u64,
            &mut b,
        );
        Some(DirRecord::decode(&b))
    }

    /// The id of the guest called `name` (the shim's `--guest name=`).
    #[must_use]
    pub fn lookup(&self, name: &str) -> Option<u32> {
        (0..vmq::DIR_ENTRIES as u32)
            .map_while(|i| self.record(i))
            .find(|r| r.is(name))
            .map(|r| r.id)
    }

    /// Outbox slots posted (the index the next post gets).
    #[must_use]
    pub fn posted(&self) -> u32 {
        self.ctr(vmq::OUTBOX + RING_PRODUCED)
            .load(Ordering::Relaxed)
    }

    /// Outbox slots the shim has acted on: statuses before this index are final.
    #[must_use]
    pub fn done(&self) -> u32 {
        self.ctr(vmq::OUTBOX + RING_CONSUMED)
            .load(Ordering::Acquire)
    }

    /// What the shim said about outbox slot `index` (valid until the slot is
    /// posted again, [`RING_ENTRIES`] posts later).
    #[must_use]
    pub fn status(&self, index: u32) -> SendStatus {
        let mut b = [0u8; 1];
        self.read(vmq::OUTBOX + vmq::entry_offset(index) + 7, &mut b);
        SendStatus::from_raw(b[0]).unwrap_or(SendStatus::BadDescriptor)
    }

    /// Posts `m` (status Pending) if the outbox has room; returns its index.
    /// Nothing leaves until this guest exits ([`Self::flush`] or any other exit).
    pub fn post(&self, m: &Message) -> Option<u32> {
        let p = self.posted();
        if p.wrapping_sub(self.done()) >= RING_ENTRIES {
            return None;
        }
        let mut e = *m;
        e.status = SendStatus::Pending as u8;
        let b: [u8; ENTRY_SIZE] = e.encode();
        self.write(vmq::OUTBOX + vmq::entry_offset(p), &b);
        self.ctr(vmq::OUTBOX + RING_PRODUCED)
            .store(p.wrapping_add(1), Ordering::Release);
        Some(p)
    }

    /// Tells the shim through an M1 doorbell event that doorbell-policy
    /// messages wait: its monitor thread has a worker drain the outbox, with
    /// no exit of ours (unless the monitor is parked and needs a kick).
    /// Without doorbells, a flush does the same with an exit.
    pub fn ring(&self) {
        use para_abi::doorbell::{Event, Op, device};
        match super::doorbell::get() {
            Ok(d) => {
                // `Doorbells::send` has already kicked a parked monitor.
                let _ = d.send(Event::new(device::VMQ, 0, Op::Notify));
            }
            Err(_) => self.flush(),
        }
    }

    /// Stores `k` at the kick page: one exit, from ring 3, with no kernel
    /// code; the shim delivers the outbox (and, for a wait, blocks this vCPU
    /// until the wait is over).
    fn kick(&self, k: &Kick) {
        // SAFETY: the kick page is inside the VM-queue reservation the boot
        // page tables map for ring 3; nothing backs it, so the store is an
        // exit the shim answers, never a memory write.
        unsafe {
            core::ptr::write_volatile((self.base + vmq::KICK as usize) as *mut u64, k.encode());
        }
    }

    /// Makes the exit that delivers the outbox now.
    pub fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.kick(&Kick::default());
    }

    /// The flush of a full outbox: the one reason a lazy sender flushes.
    pub fn flush_full(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.full_flushes.fetch_add(1, Ordering::Relaxed);
        self.kick(&Kick {
            full: true,
            ..Kick::default()
        });
    }

    /// Posts `m`, flushing first when the outbox is full; then flushes under
    /// [`Policy::Immediate`] (the status is final on return) or rings the
    /// doorbell under [`Policy::Doorbell`]. Under [`Policy::Lazy`] nothing
    /// else happens: the message leaves at this guest's next exit, at the
    /// latest the one [`Self::wait`] makes when it idles.
    pub fn send(&self, m: &Message) -> u32 {
        let mut flushed = false;
        loop {
            if let Some(i) = self.post(m) {
                if m.policy == Policy::Immediate as u8 {
                    self.flush();
                } else if m.policy == Policy::Doorbell as u8 {
                    self.ring();
                }
                return i;
            }
            if flushed {
                // Still full after a flush: a destination is holding messages
                // back (`Message::HOLD`); block in the shim until they move.
                self.wait_for(self.len(), true, 0);
            } else {
                self.flush_full();
                flushed = true;
            }
        }
    }

    /// Waits (in the shim) until outbox slot `index` has been acted on.
    pub fn settle(&self, index: u32) -> SendStatus {
        while self
            .done()
            .wrapping_sub(index.wrapping_add(1))
            .cast_signed()
            < 0
        {
            self.wait_for(self.len(), true, 0);
        }
        self.status(index)
    }

    /// One exit that delivers the outbox and blocks this vCPU in the shim
    /// until more than `seen` arrivals wait, or (`done`) every posted message
    /// was acted on, or `max_us` (0: the shim's longest, 10 ms) passes.
    pub fn wait_for(&self, seen: u32, done: bool, max_us: u32) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.kick(&Kick {
            wait: true,
            done: if done { UntilDone::Yes } else { UntilDone::No },
            seen: u16::try_from(seen).unwrap_or(u16::MAX),
            max_us,
            ..Kick::default()
        });
    }

    /// [`Self::send`] for a guest with nothing to do until its next arrival:
    /// under [`Policy::Immediate`], unless more than `seen` arrivals already
    /// wait, the flush is a wait (one exit delivers `m`, then blocks until
    /// more than `seen` arrivals wait, or `m` has been acted on after being
    /// held back). Other policies post as `send` does.
    pub fn send_then_wait(&self, m: &Message, seen: u32) -> u32 {
        if m.policy != Policy::Immediate as u8 || self.len() > seen {
            return self.send(m);
        }
        let Some(i) = self.post(m) else {
            return self.send(m);
        };
        // Counted as the flush it is (not also as a wait): one exit.
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.kick(&Kick {
            wait: true,
            done: UntilDone::IfHeld,
            seen: u16::try_from(seen).unwrap_or(u16::MAX),
            ..Kick::default()
        });
        i
    }

    /// Asks the shim for no arrival notification (upcall or interrupt) while
    /// this guest runs (`vmq::INBOX_QUIET`): right for a guest that idles
    /// only through [`Self::wait`] / [`Self::wait_for`], which see arrivals
    /// themselves; each notification to a running vCPU is an exit.
    pub fn set_quiet(&self, quiet: bool) {
        self.ctr(vmq::INBOX_QUIET)
            .store(u32::from(quiet), Ordering::Release);
    }

    /// Arrivals waiting in the inbox (a plain read, no exit).
    #[must_use]
    pub fn len(&self) -> u32 {
        let p = self.ctr(vmq::INBOX + RING_PRODUCED).load(Ordering::Acquire);
        let c = self.ctr(vmq::INBOX + RING_CONSUMED).load(Ordering::Relaxed);
        p.wrapping_sub(c)
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest arrival, without consuming it.
    #[must_use]
    pub fn peek(&self) -> Option<Arrival> {
        self.peek_at(0)
    }

    /// The `k`-th oldest arrival, without consuming anything.
    #[must_use]
    pub fn peek_at(&self, k: u32) -> Option<Arrival> {
        if k >= self.len() {
            return None;
        }
        let c = self.ctr(vmq::INBOX + RING_CONSUMED).load(Ordering::Relaxed);
        let mut b = [0u8; ENTRY_SIZE];
        self.read(vmq::INBOX + vmq::entry_offset(c.wrapping_add(k)), &mut b);
        Some(Arrival::decode(&b))
    }

    /// The bytes of arrival `a` in the receive window, or `None` if the shim
    /// named bytes outside it.
    #[must_use]
    pub fn bytes(&self, a: &Arrival) -> Option<&[u8]> {
        let w = area::VMQ + vmq::WINDOW;
        let end = a.addr.checked_add(u64::from(a.len))?;
        if a.addr < w || end > w + vmq::WINDOW_SIZE {
            return None;
        }
        // SAFETY: inside the receive window (checked), mapped for ring 3; the
        // shim does not touch an arrival's pages until we consume it.
        Some(unsafe { core::slice::from_raw_parts(a.addr as *const u8, a.len as usize) })
    }

    /// Where arrival `a`'s bytes are, for writing them in place (the guest
    /// owns them until it consumes the arrival); `None` outside the window.
    #[must_use]
    pub fn bytes_ptr(&self, a: &Arrival) -> Option<(*mut u8, usize)> {
        self.bytes(a).map(|s| (s.as_ptr().cast_mut(), s.len()))
    }

    /// Hands the oldest arrival's pages back to the shim.
    pub fn consume(&self) {
        let c = self.ctr(vmq::INBOX + RING_CONSUMED);
        if !self.is_empty() {
            c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Release);
        }
    }

    /// Returns once an arrival is waiting. Each wait is one exit to the shim
    /// (the kick page), which delivers this guest's lazily posted messages
    /// and blocks the vCPU until an arrival; a halt would be no exit the shim
    /// sees here, so it would have needed a flush of its own.
    pub fn wait(&self) {
        while self.is_empty() {
            self.wait_for(0, false, 0);
        }
    }
}
