//! virtio-net (virtio 1.2 §5.1) on `virtio-queue`, attached to a switch port.
//!
//! Queue 0 receives, queue 1 transmits. Every descriptor chain is guest input:
//! chains that are too short, too long, point outside RAM or loop are rejected
//! with a counted reason (virtio-queue bounds the walk and the address checks).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tracing::warn;
use virtio_bindings::{virtio_ids, virtio_net};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::counters::{Reject, RejectCounters};
use crate::devices::switch::{DirectRx, Port, Switch};
use crate::kvm::memory::GuestMem;
use crate::pci::virtio_pci::{Activation, F_VERSION_1, NO_VECTOR, VirtioDevice};

/// Feature bits (virtio 1.2 §5.1.3) as masks.
const F_MAC: u64 = 1 << virtio_net::VIRTIO_NET_F_MAC;
const F_STATUS: u64 = 1 << virtio_net::VIRTIO_NET_F_STATUS;
/// `struct virtio_net_hdr` with VERSION_1: 12 bytes (num_buffers included, §5.1.6).
pub const HDR_LEN: usize = std::mem::size_of::<virtio_net::virtio_net_hdr_v1>();
/// Largest frame accepted: 64 KiB of payload plus an Ethernet header.
pub const MAX_FRAME: usize = 65_536 + 14;
/// Largest frame a guest may send: an Ethernet frame of 1500 bytes of
/// payload. The device offers no segmentation offload, so an honest driver
/// never sends more; a longer frame would only reach other guests' RX
/// buffers, which are sized for this, and be refused there on their account.
pub const MAX_TX_FRAME: usize = 1514;
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices (virtio 1.2 §5.1.2).
pub const RX: usize = 0;
pub const TX: usize = 1;

#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Queue notifications read from the ioeventfd counters, per queue (rx, tx).
    pub notifications: [AtomicU64; 2],
}

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ChainError {
    /// virtio-queue refused the chain (address out of RAM, loop, bad index...).
    Bad,
    /// Shorter than the header.
    Short,
    /// Bigger than [`MAX_TX_FRAME`].
    TooBig,
}

impl ChainError {
    #[must_use]
    pub fn reason(&self) -> Reject {
        match self {
            Self::Bad | Self::Short => Reject::VirtioBadDescriptor,
            Self::TooBig => Reject::FrameTooBig,
        }
    }
}

/// True when `chain` ends where its driver ended it: with a descriptor
/// without NEXT. virtio-queue's walk stops quietly, rather than failing,
/// when a next index lies beyond the table, when it has taken as many
/// descriptors as the queue holds (a loop), or when a descriptor or an
/// indirect table cannot be read: what it yields then is a chain cut off,
/// which no honest driver makes.
fn ends_properly(chain: &DescriptorChain<&GuestMem>) -> bool {
    chain.clone().last().is_some_and(|d| !d.has_next())
}

/// Takes one frame from a TX chain (header stripped). `Ok(None)`: queue empty.
pub fn pop_tx(q: &mut Queue, mem: &GuestMem) -> Option<(u16, Result<Vec<u8>, ChainError>)> {
    let chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let res = (|| {
        if !ends_properly(&chain) {
            return Err(ChainError::Bad);
        }
        let mut r = chain.reader(mem).map_err(|_| ChainError::Bad)?;
        let n = r.available_bytes();
        if n < HDR_LEN {
            return Err(ChainError::Short);
        }
        if n - HDR_LEN > MAX_TX_FRAME {
            return Err(ChainError::TooBig);
        }
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).map_err(|_| ChainError::Bad)?;
        buf.drain(..HDR_LEN);
        Ok(buf)
    })();
    Some((head, res))
}

/// The driver's avail index when it runs more than the queue's size ahead of
/// what the device has taken: no honest driver does that, and virtio-queue
/// then yields no chain, so the queue stalls (the guest's own). `None` when
/// the index is sane (or cannot be read).
#[must_use]
pub fn avail_jump(q: &Queue, mem: &GuestMem) -> Option<u16> {
    let avail = q.avail_idx(mem, Ordering::Acquire).ok()?.0;
    (avail.wrapping_sub(q.next_avail()) > q.size()).then_some(avail)
}

/// Writes `frame` into the next RX chain. `None`: no buffer available.
/// Returns the head and the bytes written (0 when the chain was refused).
pub fn push_rx(
    q: &mut Queue,
    mem: &GuestMem,
    frame: &[u8],
) -> Option<(u16, Result<u32, ChainError>)> {
    let chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let res = (|| {
        if !ends_properly(&chain) {
            return Err(ChainError::Bad);
        }
        let mut w = chain.writer(mem).map_err(|_| ChainError::Bad)?;
        if w.available_bytes() < HDR_LEN + frame.len() {
            return Err(ChainError::Short);
        }
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1; // num_buffers = 1 (le16 at offset 10)
        w.write_all(&hdr).map_err(|_| ChainError::Bad)?;
        w.write_all(frame).map_err(|_| ChainError::Bad)?;
        Ok((HDR_LEN + frame.len()) as u32)
    })();
    Some((head, res))
}

pub struct Net {
    name: String,
    mac: [u8; 6],
    switch: Arc<Switch>,
    port_index: usize,
    port: Arc<Port>,
    pub counters: Arc<NetCounters>,
    rejects: Arc<RejectCounters>,
    worker: Option<(EventFd, JoinHandle<()>)>,
    /// M2 interrupt-vCPU hints for this NIC's queues, when offered.
    pub hints: Option<Arc<crate::mech::hints::DeviceHints>>,
    /// Asked before a queue's MSI (queue 0 RX, 1 TX): true withholds it (M4 quiet flags).
    pub quiet: Option<QuietGate>,
    /// Told after every batch of frames put into the RX used ring (M4's
    /// exitless wait: wakes a vCPU held until its RX queue has work).
    pub rx_work: Option<RxWork>,
    /// Told before each frame taken off the TX ring goes to the switch (the
    /// latency breakdown's sender stamps).
    pub tx_popped: Option<RxWork>,
    /// Runs this NIC's queue work on the caller's thread (run to completion:
    /// the M1 monitor that consumed a notification does the work itself).
    pub inline: Arc<Inline>,
    /// Offer [`Self::inline`] and push frames from the switch on the sender's
    /// thread (`--run-to-completion`); off: every hand-over wakes the worker.
    pub run_to_completion: bool,
    /// With run to completion: what the switch's sender runs instead of this
    /// NIC's RX work (`--rx-handoff monitor`: post an event to the guest's
    /// monitor, which runs it). Set once the NIC's PCI slot is known.
    pub rx_post: Arc<std::sync::OnceLock<DirectRx>>,
}

/// A NIC's queue work, callable from any host thread once the driver has
/// activated the device; until then (and after a reset) callers fall back to
/// waking the NIC's worker.
#[derive(Default)]
pub struct Inline {
    core: std::sync::RwLock<Option<Arc<Core>>>,
}

impl Inline {
    /// Does the work a notification of `queue` asks for, here and now; false
    /// when the device is not active (the caller wakes the worker instead).
    pub fn run(&self, queue: u16) -> bool {
        let core = match self.core.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let Some(core) = core else {
            return false;
        };
        match usize::from(queue) {
            RX => core.process_rx(),
            TX => core.process_tx(),
            _ => return false,
        }
        true
    }

    fn set(&self, core: Option<Arc<Core>>) {
        match self.core.write() {
            Ok(mut c) => *c = core,
            Err(p) => *p.into_inner() = core,
        }
    }
}

/// See [`Net::quiet`].
pub type QuietGate = Arc<dyn Fn(usize) -> bool + Send + Sync>;
/// See [`Net::rx_work`].
pub type RxWork = Arc<dyn Fn() + Send + Sync>;

impl Net {
    /// A NIC with `mac` on a new port of `switch`, bound to `mac`: the switch
    /// drops frames it sends from any other source MAC.
    pub fn new(
        name: &str,
        mac: [u8; 6],
        switch: Arc<Switch>,
        rejects: Arc<RejectCounters>,
    ) -> std::io::Result<Self> {
        let (port_index, port) = switch.add_nic_port(name, mac)?;
        Ok(Self {
            name: name.to_owned(),
            mac,
            switch,
            port_index,
            port,
            counters: Arc::default(),
            rejects,
            worker: None,
            hints: None,
            quiet: None,
            rx_work: None,
            tx_popped: None,
            inline: Arc::default(),
            run_to_completion: false,
            rx_post: Arc::default(),
        })
    }

    #[must_use]
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Its port number on the switch.
    #[must_use]
    pub const fn port_index(&self) -> usize {
        self.port_index
    }

    fn stop_worker(&mut self) {
        self.inline.set(None);
        self.port.set_direct(None);
        if let Some((stop, h)) = self.worker.take() {
            let _ = stop.write(1);
            let _ = h.join();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        virtio_ids::VIRTIO_ID_NET as u16
    }
    fn class_code(&self) -> u32 {
        0x02_00_00 // network controller, Ethernet
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_STATUS
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status le16 (LINK_UP), max_virtqueue_pairs le16 (§5.1.4).
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6] = virtio_net::VIRTIO_NET_S_LINK_UP as u8;
        cfg[8] = 1;
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> Option<Reject> {
        // Without VIRTIO_NET_F_CTRL_MAC_ADDR the configuration is read-only (§5.1.4).
        Some(Reject::VirtioBadRegister)
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        self.stop_worker();
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err("virtio-net needs two queues".into());
        };
        let rx = rx_quiet(rx, &a.mem);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let core = Arc::new(Core {
            name: self.name.clone(),
            mem: a.mem,
            vectors: [
                a.vectors.first().copied().unwrap_or(NO_VECTOR),
                a.vectors.get(1).copied().unwrap_or(NO_VECTOR),
            ],
            msix: a.msix,
            switch: self.switch.clone(),
            port_index: self.port_index,
            port: self.port.clone(),
            counters: self.counters.clone(),
            rejects: self.rejects.clone(),
            quiet: self.quiet.clone(),
            rx_work: self.rx_work.clone(),
            tx_popped: self.tx_popped.clone(),
            jumps: std::sync::Mutex::new([None; 2]),
            rx: std::sync::Mutex::new(RxSide {
                q: rx,
                refill_wanted: false,
                // Only RX: TX completions are reaped on the send path (the guest
                // masks the TX vector), so a TX hint would steer nothing.
                hint: self.hints.as_ref().and_then(|h| h.queue(RX as u16)),
            }),
            tx: std::sync::Mutex::new(tx),
        });
        let w = Worker {
            name: self.name.clone(),
            notify: a.notify,
            doorbell: a.doorbell,
            port: self.port.clone(),
            counters: self.counters.clone(),
            stop: stop.try_clone().map_err(|e| e.to_string())?,
            core: core.clone(),
        };
        if self.run_to_completion {
            self.inline.set(Some(core.clone()));
            // Frames the switch hands this port are pushed into the RX ring on
            // the sender's thread (no wake-up of this NIC's worker per frame),
            // or announced to the guest's monitor, which does it.
            let direct: DirectRx = match self.rx_post.get() {
                Some(post) => post.clone(),
                None => Arc::new(move || core.process_rx()),
            };
            self.port.set_direct(Some(direct));
        }
        let h = std::thread::Builder::new()
            .name(format!("{}-net", self.name))
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Net);
                w.run();
            })
            .map_err(|e| e.to_string())?;
        self.worker = Some((stop, h));
        Ok(())
    }
    fn reset(&mut self) {
        self.stop_worker();
    }
}

/// The receive side: the queue and its hint, under one lock.
struct RxSide {
    q: Queue,
    hint: Option<crate::mech::hints::QueueHinter>,
    /// The device asked for the driver's next RX refill notification (it ran
    /// out of buffers); otherwise the used ring says `VRING_USED_F_NO_NOTIFY`.
    refill_wanted: bool,
}

/// The RX queue with refill notifications off (virtio 1.2 §2.7.7.1: the
/// device sets `VRING_USED_F_NO_NOTIFY`): a driver re-posting buffers
/// notifies only after the device ran out and asked, so a guest that keeps
/// its ring stocked rings no doorbell for RX. Frames are pushed whenever they
/// come, and the buffers are looked for then.
fn rx_quiet(mut q: Queue, mem: &GuestMem) -> Queue {
    let _ = q.disable_notification(mem);
    q
}

/// A NIC's queues and what their work needs; any host thread may run it.
/// Lock order: a thread holds at most one queue lock of one NIC, and never
/// while it hands frames to the switch (which may run another NIC's RX work).
pub struct Core {
    name: String,
    mem: GuestMem,
    vectors: [u16; 2],
    msix: Arc<crate::pci::msix::Msix>,
    switch: Arc<Switch>,
    port_index: usize,
    port: Arc<Port>,
    counters: Arc<NetCounters>,
    rejects: Arc<RejectCounters>,
    quiet: Option<QuietGate>,
    rx_work: Option<RxWork>,
    tx_popped: Option<RxWork>,
    /// Per queue, the avail index of the last jump counted (each jump once).
    jumps: std::sync::Mutex<[Option<u16>; 2]>,
    rx: std::sync::Mutex<RxSide>,
    tx: std::sync::Mutex<Queue>,
}

/// The NIC's own thread: waits for notifications that arrive as eventfds
/// (the notify register's ioeventfd, a doorbell the monitor could not run
/// inline, frames queued on the port) and runs the core's work for them.
struct Worker {
    name: String,
    notify: Vec<EventFd>,
    doorbell: Vec<EventFd>,
    port: Arc<Port>,
    counters: Arc<NetCounters>,
    stop: EventFd,
    core: Arc<Core>,
}

const T_RX: u64 = 0;
const T_TX: u64 = 1;
const T_PORT: u64 = 2;
const T_STOP: u64 = 3;
const T_DOORBELL_RX: u64 = 4;
const T_DOORBELL_TX: u64 = 5;

impl Worker {
    fn run(self) {
        let Ok(epoll) = Epoll::new() else {
            warn!(nic = %self.name, "epoll_create failed; NIC stays silent");
            return;
        };
        let add = |fd: i32, t: u64| {
            let _ = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, t));
        };
        if let (Some(r), Some(t)) = (self.notify.first(), self.notify.get(1)) {
            add(r.as_raw_fd(), T_RX);
            add(t.as_raw_fd(), T_TX);
        }
        if let (Some(r), Some(t)) = (self.doorbell.first(), self.doorbell.get(1)) {
            add(r.as_raw_fd(), T_DOORBELL_RX);
            add(t.as_raw_fd(), T_DOORBELL_TX);
        }
        add(self.port.ready.as_raw_fd(), T_PORT);
        add(self.stop.as_raw_fd(), T_STOP);
        self.core.follow_io_placement();
        // Frames may already wait; the driver may have queued TX before we started.
        self.core.process_tx();
        self.core.process_rx();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(nic = %self.name, "epoll_wait: {e}");
                    return;
                }
            };
            self.core.follow_io_placement();
            for ev in &events[..n] {
                match ev.data() {
                    T_STOP => return,
                    T_TX => {
                        self.count_notify(TX);
                        self.core.process_tx();
                    }
                    T_RX => {
                        self.count_notify(RX);
                        self.core.process_rx();
                    }
                    // Doorbell notifications (M1): counted by the monitor.
                    T_DOORBELL_TX => {
                        let _ = self.doorbell[TX].read();
                        self.core.process_tx();
                    }
                    T_DOORBELL_RX => {
                        let _ = self.doorbell[RX].read();
                        self.core.process_rx();
                    }
                    _ => {
                        let _ = self.port.ready.read();
                        self.core.process_rx();
                    }
                }
            }
        }
    }

    fn count_notify(&self, q: usize) {
        if let Ok(n) = self.notify[q].read() {
            self.counters.notifications[q].fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Core {
    /// Moves the calling thread where `--io-cpu` (or a run-time move) says (M2).
    fn follow_io_placement(&self) {
        if let Some(h) = &mut crate::sync::lock(&self.rx).hint {
            h.follow_placement();
        }
    }

    /// Raises queue `q`'s MSI unless the driver or a quiet flag withholds it.
    fn signal(
        &self,
        q: usize,
        queue: &mut Queue,
        hint: Option<&mut crate::mech::hints::QueueHinter>,
    ) {
        // Honour VIRTQ_AVAIL_F_NO_INTERRUPT / used_event (virtio 1.2 §2.7.10).
        if queue.needs_notification(&self.mem).unwrap_or(true)
            && self.vectors[q] != NO_VECTOR
            && !self.quiet.as_ref().is_some_and(|quiet| quiet(q))
        {
            // M2: the hint goes out before the interrupt it describes.
            if let Some(h) = hint {
                h.before_interrupt(self.msix.destination(self.vectors[q]));
            }
            self.msix.trigger(self.vectors[q]);
        }
    }

    fn reject(&self, e: &ChainError, q: &str) {
        let r = e.reason();
        self.rejects.bump(r);
        crate::guest_log!(warn, limit = self.rejects.limit(r), nic = %self.name, queue = q, reason = r.name(), "rejected descriptor chain: {e:?}");
    }

    /// Counts and logs (once per jump) an avail index that stalls queue `q`.
    fn check_avail_jump(&self, q: usize, queue: &Queue) {
        let Some(avail) = avail_jump(queue, &self.mem) else {
            return;
        };
        {
            let mut jumps = crate::sync::lock(&self.jumps);
            if jumps[q] == Some(avail) {
                return;
            }
            jumps[q] = Some(avail);
        }
        let next = queue.next_avail();
        self.rejects.reject(
            Reject::VirtioAvailJump,
            &self.name,
            "virtio-net",
            format_args!(
                "{} avail index {avail} is more than the queue size ahead of {next}: the queue stalls",
                if q == RX { "rx" } else { "tx" }
            ),
        );
    }

    /// Takes every frame off the TX ring, then (the queue lock released)
    /// hands them to the switch.
    pub fn process_tx(&self) {
        let mut frames = Vec::new();
        {
            let mut tx = crate::sync::lock(&self.tx);
            let mut used = false;
            while let Some((head, res)) = pop_tx(&mut tx, &self.mem) {
                match res {
                    Ok(frame) => {
                        if let Some(t) = &self.tx_popped {
                            t();
                        }
                        self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .tx_bytes
                            .fetch_add(frame.len() as u64, Ordering::Relaxed);
                        frames.push(frame);
                    }
                    Err(e) => self.reject(&e, "tx"),
                }
                if tx.add_used(&self.mem, head, 0).is_err() {
                    self.reject(&ChainError::Bad, "tx");
                    break;
                }
                used = true;
            }
            if used {
                self.signal(TX, &mut tx, None);
            } else {
                self.check_avail_jump(TX, &tx);
            }
        }
        for f in &frames {
            self.switch.send(self.port_index, f);
        }
    }

    /// Moves frames waiting on the port into the RX ring and wakes the guest.
    pub fn process_rx(&self) {
        let mut rx = crate::sync::lock(&self.rx);
        let RxSide {
            q,
            hint,
            refill_wanted,
        } = &mut *rx;
        if std::mem::take(refill_wanted) {
            // Refilled (or about to be looked at): quiet again.
            let _ = q.disable_notification(&self.mem);
        }
        let mut used = false;
        // A frame went into the ring since the last look for buffers.
        let mut progress = true;
        while let Some(frame) = self.port.pop() {
            match push_rx(q, &self.mem, &frame) {
                None => {
                    // No buffer: keep the frame until the driver refills (bounded by the port queue).
                    self.port.unpop(frame);
                    // Ask for the refill's notification, then look again: a
                    // buffer posted before the driver saw the flag notifies
                    // nobody. Only after progress: a hostile avail index keeps
                    // "new buffers" showing that never pop.
                    *refill_wanted = true;
                    let more = q.enable_notification(&self.mem).unwrap_or(false);
                    if more && progress {
                        progress = false;
                        *refill_wanted = false;
                        let _ = q.disable_notification(&self.mem);
                        continue;
                    }
                    // A guest that never refills its ring gets here at every frame.
                    crate::guest_log!(debug, nic = %self.name, "rx ring empty; {} frames wait", self.port.pending());
                    self.check_avail_jump(RX, q);
                    break;
                }
                Some((head, res)) => {
                    let len = match res {
                        Ok(n) => {
                            self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                            self.counters
                                .rx_bytes
                                .fetch_add(frame.len() as u64, Ordering::Relaxed);
                            n
                        }
                        Err(e) => {
                            self.reject(&e, "rx");
                            0
                        }
                    };
                    if q.add_used(&self.mem, head, len).is_err() {
                        self.reject(&ChainError::Bad, "rx");
                        break;
                    }
                    used = true;
                    progress = true;
                }
            }
        }
        if used {
            // The frame is in the ring: wake a held vCPU first (no MSI then
            // when its quiet flag is set), then the interrupt for the others.
            if let Some(w) = &self.rx_work {
                w();
            }
            self.signal(RX, q, hint.as_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMem {
        crate::kvm::memory::create("t", 4 << 20).unwrap()
    }

    /// A queue whose chains are the given descriptors (flags NEXT set by caller).
    fn queue_with(m: &GuestMem, descs: &[(u64, u32, u16, u16)]) -> Queue {
        let mq = MockSplitQueue::new(m, 16);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mq.desc_table().store(i as u16, d).unwrap();
        }
        mq.avail().ring().ref_at(0).unwrap().store(0u16);
        mq.avail().idx().store(1u16);
        mq.create_queue().unwrap()
    }

    #[test]
    fn an_avail_index_jump_is_seen() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 64, 0, 0));
        mq.desc_table().store(0, d).unwrap();
        mq.avail().ring().ref_at(0).unwrap().store(0u16);
        mq.avail().idx().store(1u16);
        let mut q = mq.create_queue().unwrap();
        assert_eq!(avail_jump(&q, &m), None, "one chain ahead: sane");
        // The driver claims 1000 new chains in a ring of 16.
        mq.avail().idx().store(1000u16);
        assert_eq!(avail_jump(&q, &m), Some(1000));
        assert!(q.pop_descriptor_chain(&m).is_none(), "the queue stalls");
        // Exactly a ring's worth ahead is still legal.
        mq.avail().idx().store(16u16);
        assert_eq!(avail_jump(&q, &m), None);
    }

    #[test]
    fn tx_frame_is_taken_without_its_header() {
        let m = mem();
        let mut payload = vec![0u8; HDR_LEN];
        payload.extend_from_slice(b"frame-bytes-here");
        m.write_slice(&payload, GuestAddress(0x10_0000)).unwrap();
        // Header and frame split over two descriptors.
        let mut q = queue_with(
            &m,
            &[
                (0x10_0000, 5, VRING_DESC_F_NEXT, 1),
                (0x10_0005, payload.len() as u32 - 5, 0, 0),
            ],
        );
        let (head, frame) = pop_tx(&mut q, &m).unwrap();
        assert_eq!(head, 0);
        assert_eq!(frame.unwrap(), b"frame-bytes-here");
        assert!(pop_tx(&mut q, &m).is_none());
    }

    #[test]
    fn hostile_tx_chains_are_refused() {
        let m = mem();
        // Out of RAM.
        let mut q = queue_with(&m, &[(0x7FFF_0000, 64, 0, 0)]);
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Err(ChainError::Bad));
        // Shorter than the header.
        let mut q = queue_with(&m, &[(0x10_0000, 4, 0, 0)]);
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Err(ChainError::Short));
        // A loop: 0 -> 1 -> 0 ... virtio-queue stops after queue-size
        // descriptors without an error; the 16 x 32 bytes would pass as a frame.
        let mut q = queue_with(
            &m,
            &[
                (0x10_0000, 32, VRING_DESC_F_NEXT, 1),
                (0x10_0000, 32, VRING_DESC_F_NEXT, 0),
            ],
        );
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Err(ChainError::Bad));
        // A descriptor chained to itself.
        let mut q = queue_with(&m, &[(0x10_0000, 64, VRING_DESC_F_NEXT, 0)]);
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Err(ChainError::Bad));
        // Too big: 8 descriptors of 16 KiB > MAX_FRAME.
        let big: Vec<_> = (0..8)
            .map(|i| {
                (
                    0x10_0000,
                    16 << 10,
                    if i < 7 { VRING_DESC_F_NEXT } else { 0 },
                    i + 1,
                )
            })
            .collect();
        let mut q = queue_with(&m, &big);
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Err(ChainError::TooBig));
        // One byte over an Ethernet frame of 1500 bytes of payload: refused;
        // exactly one: taken.
        for (len, ok) in [(MAX_TX_FRAME + 1, false), (MAX_TX_FRAME, true)] {
            let mut q = queue_with(&m, &[(0x10_0000, (HDR_LEN + len) as u32, 0, 0)]);
            let r = pop_tx(&mut q, &m).unwrap().1;
            assert_eq!(
                r.as_ref().map(Vec::len).map_err(|_| ()),
                if ok { Ok(len) } else { Err(()) }
            );
            if !ok {
                assert_eq!(r, Err(ChainError::TooBig));
            }
        }
        // Next index beyond the table: virtio-queue ends the chain there
        // quietly; the device refuses it.
        let mut q = queue_with(&m, &[(0x10_0000, 64, VRING_DESC_F_NEXT, 200)]);
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Err(ChainError::Bad));
    }

    #[test]
    fn rx_writes_header_and_frame_or_refuses_small_buffers() {
        let m = mem();
        let mut q = queue_with(&m, &[(0x20_0000, 2048, VRING_DESC_F_WRITE, 0)]);
        let (_, n) = push_rx(&mut q, &m, b"hello").unwrap();
        assert_eq!(n, Ok((HDR_LEN + 5) as u32));
        let mut back = [0u8; HDR_LEN + 5];
        m.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(back[10], 1, "num_buffers");
        assert_eq!(&back[HDR_LEN..], b"hello");
        let mut q = queue_with(&m, &[(0x20_0000, 8, VRING_DESC_F_WRITE, 0)]);
        assert_eq!(
            push_rx(&mut q, &m, b"hello").unwrap().1,
            Err(ChainError::Short)
        );
        // A read-only buffer offered for RX has no writable bytes.
        let mut q = queue_with(&m, &[(0x20_0000, 2048, 0, 0)]);
        assert_eq!(push_rx(&mut q, &m, b"x").unwrap().1, Err(ChainError::Short));
    }

    #[test]
    fn hostile_rx_chains_are_refused_and_guest_memory_outside_them_is_untouched() {
        let m = mem();
        // Out of RAM.
        let mut q = queue_with(&m, &[(0x7FFF_0000, 2048, VRING_DESC_F_WRITE, 0)]);
        assert!(push_rx(&mut q, &m, b"frame").unwrap().1.is_err());
        // Straddling the end of RAM (4 MiB).
        let mut q = queue_with(&m, &[((4 << 20) - 8, 2048, VRING_DESC_F_WRITE, 0)]);
        assert!(push_rx(&mut q, &m, b"frame").unwrap().1.is_err());
        // A loop of writable descriptors: bounded, never an endless write.
        let mut q = queue_with(
            &m,
            &[
                (0x20_0000, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                (0x20_0004, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
            ],
        );
        let r = push_rx(&mut q, &m, &[0x55; 200]).unwrap().1;
        assert!(r.is_err(), "{r:?}");
        // A descriptor chained to itself, with room for the frame in the
        // first pass already: a loop all the same.
        let mut q = queue_with(
            &m,
            &[(0x20_0000, 2048, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)],
        );
        assert_eq!(
            push_rx(&mut q, &m, b"frame").unwrap().1,
            Err(ChainError::Bad)
        );
        // Next index beyond the table.
        let mut q = queue_with(
            &m,
            &[(0x20_0000, 2048, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 999)],
        );
        assert_eq!(
            push_rx(&mut q, &m, b"frame").unwrap().1,
            Err(ChainError::Bad)
        );
        // Read-only buffers on the RX queue.
        let mut q = queue_with(&m, &[(0x20_0000, 2048, 0, 0)]);
        assert_eq!(
            push_rx(&mut q, &m, b"frame").unwrap().1,
            Err(ChainError::Short)
        );
        // A zero-length buffer.
        let mut q = queue_with(&m, &[(0x20_0000, 0, VRING_DESC_F_WRITE, 0)]);
        assert_eq!(
            push_rx(&mut q, &m, b"frame").unwrap().1,
            Err(ChainError::Short)
        );
        // Refused chains wrote nothing past the buffers they named.
        let mut after = [0u8; 16];
        m.read_slice(&mut after, GuestAddress(0x20_0008)).unwrap();
        assert_eq!(after, [0; 16]);
    }

    #[test]
    fn tx_chains_with_wrong_lengths_are_refused() {
        let m = mem();
        // Straddling the end of RAM.
        let mut q = queue_with(&m, &[((4 << 20) - 8, 64, 0, 0)]);
        assert!(pop_tx(&mut q, &m).unwrap().1.is_err());
        // Zero-length descriptors only: no header.
        let mut q = queue_with(
            &m,
            &[(0x10_0000, 0, VRING_DESC_F_NEXT, 1), (0x10_0000, 0, 0, 0)],
        );
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Err(ChainError::Short));
        // A length near u32::MAX: too big, not an allocation of 4 GiB.
        let mut q = queue_with(&m, &[(0x10_0000, u32::MAX, 0, 0)]);
        assert!(pop_tx(&mut q, &m).unwrap().1.is_err());
        // Exactly a header: an empty frame, which the switch drops as a runt.
        let mut q = queue_with(&m, &[(0x10_0000, HDR_LEN as u32, 0, 0)]);
        assert_eq!(pop_tx(&mut q, &m).unwrap().1, Ok(Vec::new()));
        // Reasons map to their counters.
        assert_eq!(ChainError::Bad.reason(), Reject::VirtioBadDescriptor);
        assert_eq!(ChainError::Short.reason(), Reject::VirtioBadDescriptor);
        assert_eq!(ChainError::TooBig.reason(), Reject::FrameTooBig);
    }
}
