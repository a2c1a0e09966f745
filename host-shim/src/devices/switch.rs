//! An in-process L2 learning switch between the guests' NICs (and an optional TAP).
//!
//! Learning per IEEE 802.1D §7.8, with one restriction: the switch sits between
//! hostile guests, so a guest must not be able to take another's address. Each
//! guest NIC's port is bound to the MAC the shim gave that NIC: the binding is in
//! the table from the start (frames to it never flood), frames from the port with
//! any other source are dropped and counted, and traffic never moves a bound MAC.
//! Only an open port (the TAP, which carries the host's many addresses) learns
//! its sources, and it may not claim a bound MAC either. Learned entries are
//! bounded ([`LEARNED_MAX`], least recently seen evicted first) and age out
//! ([`AGEING`]), so a flood of made-up source MACs costs a fixed amount of memory.
//!
//! One guest's flood must not cost the others their frames. Two rules see to
//! it. Each port's inbox keeps one queue per sending port and serves them
//! round robin; when the inbox is full, the frame dropped is one of the
//! sender holding the most of it (longest queue drop), so a flooder fills
//! only its own share and a light sender's frame always finds room. And the
//! frames a port floods to every other port (broadcast, multicast, unknown
//! unicast) draw on a token bucket per port ([`FLOOD_BURST`], [`FLOOD_RATE`]),
//! so a broadcast storm is cut at the ingress before it fills anyone's inbox.
//! Every drop is counted by reason against the port that sent the frame
//! ([`PortDrop`]), and logged through that reason's rate limit.

use crate::sync::lock;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::counters::Tally;
use crate::reasons;
use crate::report::SwitchPortReport;

/// Frames queued per port (over all its senders) before one is dropped (and counted).
pub const PORT_QUEUE: usize = 512;
/// Frames a port may flood to every other port at once (ARP, DHCP and
/// neighbour discovery send a few; a storm sends thousands)...
pub const FLOOD_BURST: u32 = 256;
/// ...and then per second.
pub const FLOOD_RATE: u32 = 2000;
/// Smallest frame carrying Ethernet addresses and type.
pub const MIN_FRAME: usize = 14;
/// Learned (not bound) MACs the table holds at most; at the cap the least
/// recently seen eighth is evicted at once, so a flood pays for one pass per
/// `LEARNED_MAX / 8` new MACs.
pub const LEARNED_MAX: usize = 1024;
/// A learned MAC not seen for this long is forgotten (802.1D's default ageing time).
pub const AGEING: Duration = Duration::from_mins(5);

pub type Mac = [u8; 6];

reasons! {
    /// Why the switch dropped a frame, counted against the port that sent it.
    pub PortDrop {
        /// Its source MAC was not the port's to use.
        ForgedSource => "forged_source",
        /// It would have flooded beyond the port's flood budget.
        FloodBudget => "flood_budget",
        /// The destination's inbox was full and this port held the most of it.
        QueueFull => "queue_full",
    }
}

/// A port's inbox: one FIFO per sending port, served round robin, at most
/// [`PORT_QUEUE`] frames over all of them.
#[derive(Default)]
struct Inbox {
    /// (sending port, its frames), in the order senders first appeared.
    queues: Vec<(usize, VecDeque<Vec<u8>>)>,
    len: usize,
    /// The position in `queues` served next.
    next: usize,
    /// Where the frame popped last came from, for [`Inbox::unpop`].
    last: Option<usize>,
}

impl Inbox {
    /// The position of `from`'s queue, made on its first frame (at most one
    /// per port of the switch).
    fn index(&mut self, from: usize) -> usize {
        self.queues
            .iter()
            .position(|(p, _)| *p == from)
            .unwrap_or_else(|| {
                self.queues.push((from, VecDeque::new()));
                self.queues.len() - 1
            })
    }

    fn queue(&mut self, from: usize) -> &mut VecDeque<Vec<u8>> {
        let i = self.index(from);
        &mut self.queues[i].1
    }

    /// Queues `frame` from port `from`. When the inbox is full, drops the
    /// newest frame of the sender holding the most of it (the arriving one
    /// if that is `from`, ties included) and returns that sender.
    fn push(&mut self, from: usize, frame: Vec<u8>) -> Option<usize> {
        if self.len < PORT_QUEUE {
            self.queue(from).push_back(frame);
            self.len += 1;
            return None;
        }
        let own = self.queue(from).len();
        let heaviest = self
            .queues
            .iter_mut()
            .max_by_key(|(_, q)| q.len())
            .filter(|(_, q)| q.len() > own);
        match heaviest {
            Some((victim, q)) => {
                let victim = *victim;
                q.pop_back();
                self.queue(from).push_back(frame);
                Some(victim)
            }
            None => Some(from),
        }
    }

    fn pop(&mut self) -> Option<Vec<u8>> {
        let n = self.queues.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let (from, q) = &mut self.queues[i];
            if let Some(f) = q.pop_front() {
                self.last = Some(*from);
                self.next = (i + 1) % n;
                self.len -= 1;
                return Some(f);
            }
        }
        None
    }

    /// Puts `frame` back at the head of the queue it was popped from, and
    /// serves that queue next, so the order is as if it was never taken.
    fn unpop(&mut self, frame: Vec<u8>) {
        let i = self.index(self.last.unwrap_or(usize::MAX));
        self.queues[i].1.push_front(frame);
        self.next = i;
        self.len += 1;
    }
}

/// A token bucket: [`FLOOD_BURST`] tokens, refilled at [`FLOOD_RATE`] a second.
struct FloodBudget {
    tokens: f64,
    at: Option<Instant>,
}

impl Default for FloodBudget {
    fn default() -> Self {
        Self {
            tokens: f64::from(FLOOD_BURST),
            at: None,
        }
    }
}

impl FloodBudget {
    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * f64::from(FLOOD_RATE);
            self.tokens = (self.tokens + refill).min(f64::from(FLOOD_BURST));
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One switch port's inbox; its owner waits on `ready`.
pub struct Port {
    pub name: String,
    /// The one source MAC a guest NIC's port may send from; `None` for an open port.
    pub mac: Option<Mac>,
    inbox: Mutex<Inbox>,
    pub ready: EventFd,
    /// Frames this port sent that the switch dropped, by reason.
    pub drops: Tally<PortDrop>,
    /// Frames to this port dropped at its full inbox (whoever sent them).
    pub inbox_dropped: AtomicU64,
    flood: Mutex<FloodBudget>,
    /// Run on the sender's thread after a frame lands in the inbox (the
    /// owner's RX work, run to completion); unset: `ready` wakes the owner.
    direct: std::sync::RwLock<Option<DirectRx>>,
}

/// See [`Port::set_direct`].
pub type DirectRx = Arc<dyn Fn() + Send + Sync>;

impl Port {
    /// Takes the next frame for this port.
    pub fn pop(&self) -> Option<Vec<u8>> {
        lock(&self.inbox).pop()
    }

    /// Puts the frame [`Self::pop`] returned last back at the head (the NIC
    /// had no buffer for it).
    pub fn unpop(&self, frame: Vec<u8>) {
        lock(&self.inbox).unpop(frame);
    }

    #[must_use]
    pub fn pending(&self) -> usize {
        lock(&self.inbox).len
    }

    /// Has the sender's thread run `f` (the owner's RX work) after queueing a
    /// frame, instead of waking the owner through `ready`; `None` goes back to
    /// waking it.
    pub fn set_direct(&self, f: Option<DirectRx>) {
        match self.direct.write() {
            Ok(mut d) => *d = f,
            Err(p) => *p.into_inner() = f,
        }
    }

    fn direct(&self) -> Option<DirectRx> {
        match self.direct.read() {
            Ok(d) => d.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Where a MAC lives, and whether traffic may move it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    port: usize,
    /// When a frame last came from it; `None` for a MAC bound to a NIC (set from
    /// the NIC's configuration, never from traffic, never aged).
    seen: Option<Instant>,
}

impl Entry {
    fn bound(&self) -> bool {
        self.seen.is_none()
    }

    fn aged(&self, now: Instant) -> bool {
        self.seen
            .is_some_and(|t| now.saturating_duration_since(t) >= AGEING)
    }
}

#[derive(Default)]
struct Table {
    map: HashMap<Mac, Entry>,
    learned: usize,
}

impl Table {
    fn get(&self, mac: Mac) -> Option<&Entry> {
        self.map.get(&mac)
    }

    fn bind(&mut self, mac: Mac, port: usize) {
        let old = self.map.insert(mac, Entry { port, seen: None });
        if old.is_some_and(|e| !e.bound()) {
            self.learned -= 1;
        }
    }

    /// Learns (or refreshes) `mac` behind `port`; returns (evicted, aged out).
    fn learn(&mut self, mac: Mac, port: usize, now: Instant) -> (u64, u64) {
        let mut dropped = (0, 0);
        if !self.map.contains_key(&mac) {
            if self.learned >= LEARNED_MAX {
                dropped = self.make_room(now);
            }
            self.learned += 1;
        }
        self.map.insert(
            mac,
            Entry {
                port,
                seen: Some(now),
            },
        );
        dropped
    }

    /// Forgets aged entries, and if that is not enough, the least recently seen
    /// eighth of the learned ones. Returns (evicted, aged out).
    fn make_room(&mut self, now: Instant) -> (u64, u64) {
        let before = self.map.len();
        self.map.retain(|_, e| !e.aged(now));
        let aged = before - self.map.len();
        self.learned -= aged;
        if self.learned < LEARNED_MAX {
            return (0, aged as u64);
        }
        let mut seen: Vec<Instant> = self.map.values().filter_map(|e| e.seen).collect();
        let k = LEARNED_MAX / 8;
        let (_, &mut cut, _) = seen.select_nth_unstable(k - 1);
        let mut evicted = 0;
        self.map.retain(|_, e| {
            let go = e.seen.is_some_and(|t| t <= cut) && evicted < k;
            evicted += usize::from(go);
            !go
        });
        self.learned -= evicted;
        (evicted as u64, aged as u64)
    }

    /// The port behind `mac`, forgetting it if it aged out; returns (port, aged).
    fn lookup(&mut self, mac: Mac, now: Instant) -> (Option<usize>, bool) {
        match self.map.get(&mac) {
            Some(e) if e.aged(now) => {
                self.map.remove(&mac);
                self.learned -= 1;
                (None, true)
            }
            e => (e.map(|e| e.port), false),
        }
    }
}

#[derive(Default)]
pub struct Switch {
    /// Indexed by port number; a removed port leaves `None` until a new
    /// port takes its number.
    ports: Mutex<Vec<Option<Arc<Port>>>>,
    table: Mutex<Table>,
    pub forwarded: AtomicU64,
    pub flooded: AtomicU64,
    pub dropped: AtomicU64,
    pub runts: AtomicU64,
    /// Frames dropped because their source MAC was not their port's to use: a
    /// guest sending from anything but its NIC's MAC, or the TAP claiming a
    /// guest's MAC.
    pub forged: AtomicU64,
    /// Learned MACs evicted at the cap, and forgotten after [`AGEING`].
    pub evicted: AtomicU64,
    pub aged_out: AtomicU64,
    /// Frames a port would have flooded beyond its budget.
    pub flood_limited: AtomicU64,
}

fn fmt_mac(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Switch {
    /// Adds an open port (the TAP): it learns the source MACs it carries, except
    /// those bound to a guest NIC. Returns its index and handle.
    pub fn add_port(&self, name: &str) -> std::io::Result<(usize, Arc<Port>)> {
        self.add(name, None)
    }

    /// Adds the port of a guest NIC whose (shim-assigned) MAC is `mac`: the
    /// port sends from `mac` only, and frames to `mac` go to it alone. Refuses a
    /// MAC that is multicast or bound to another port already.
    pub fn add_nic_port(&self, name: &str, mac: Mac) -> std::io::Result<(usize, Arc<Port>)> {
        if mac[0] & 1 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("NIC {name}: MAC {} is multicast", fmt_mac(mac)),
            ));
        }
        self.add(name, Some(mac))
    }

    fn add(&self, name: &str, mac: Option<Mac>) -> std::io::Result<(usize, Arc<Port>)> {
        let port = Arc::new(Port {
            name: name.to_owned(),
            mac,
            inbox: Mutex::default(),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
            drops: Tally::default(),
            inbox_dropped: AtomicU64::new(0),
            flood: Mutex::default(),
            direct: std::sync::RwLock::new(None),
        });
        let mut ports = lock(&self.ports);
        // A removed port's number is free again: its table entries went with it.
        let index = ports
            .iter()
            .position(Option::is_none)
            .unwrap_or(ports.len());
        if let Some(mac) = mac {
            let mut table = self.table();
            if let Some(e) = table.get(mac).filter(|e| e.bound()) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "NIC {name}: MAC {} is already bound to port {}",
                        fmt_mac(mac),
                        e.port
                    ),
                ));
            }
            // Replaces anything the TAP may have learned for it before the NIC existed.
            table.bind(mac, index);
        }
        if index == ports.len() {
            ports.push(Some(port.clone()));
        } else {
            ports[index] = Some(port.clone());
        }
        Ok((index, port))
    }

    /// Removes port `index` (the NIC of a guest removed at run time): its MAC binding
    /// and every MAC learned behind it are forgotten, and frames in flight
    /// to it are dropped with its inbox.
    pub fn remove_port(&self, index: usize) {
        let mut ports = lock(&self.ports);
        let Some(slot) = ports.get_mut(index) else {
            return;
        };
        if slot.take().is_none() {
            return;
        }
        let mut table = self.table();
        let mut learned_gone = 0;
        table.map.retain(|_, e| {
            let gone = e.port == index;
            learned_gone += usize::from(gone && !e.bound());
            !gone
        });
        table.learned -= learned_gone;
    }

    /// Removes the port bound to `mac`, if any (a NIC whose guest could not
    /// be built).
    pub fn remove_nic_port(&self, mac: Mac) {
        let port = self.table().get(mac).filter(|e| e.bound()).map(|e| e.port);
        if let Some(p) = port {
            self.remove_port(p);
        }
    }

    /// Ports in use: guest NICs and the TAP.
    #[must_use]
    pub fn port_count(&self) -> usize {
        lock(&self.ports).iter().flatten().count()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Queues `frame` from port `from` in `to`'s inbox; a full inbox drops
    /// the frame of its heaviest sender, counted against that sender.
    fn deliver(&self, ports: &[Option<Arc<Port>>], from: usize, to: &Port, frame: Vec<u8>) {
        let charged = lock(&to.inbox).push(from, frame);
        if let Some(sender) = charged {
            to.inbox_dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(Some(s)) = ports.get(sender) {
                Self::count_drop(s, PortDrop::QueueFull, &to.name);
            }
        }
        if charged == Some(from) {
            return; // nothing new arrived
        }
        match to.direct() {
            Some(run) => run(),
            None => {
                let _ = to.ready.write(1);
            }
        }
    }

    /// Counts a frame `port` sent that was dropped for `why`, with a log line
    /// through that port's limit for the reason.
    fn count_drop(port: &Port, why: PortDrop, detail: &str) {
        port.drops.bump(why);
        crate::guest_log!(
            warn,
            limit = port.drops.limit(why),
            port = %port.name,
            reason = why.name(),
            "switch dropped a frame: {detail}"
        );
    }

    /// Counts and (rate-limited) logs a frame dropped for its source MAC.
    fn refuse_source(&self, port: &Port, src: Mac, why: &str) {
        self.forged.fetch_add(1, Ordering::Relaxed);
        Self::count_drop(
            port,
            PortDrop::ForgedSource,
            &format!("source MAC {} {why}", fmt_mac(src)),
        );
    }

    /// Forwards `frame` that arrived on port `from`.
    pub fn send(&self, from: usize, frame: &[u8]) {
        self.send_at(from, frame, Instant::now());
    }

    fn send_at(&self, from: usize, frame: &[u8], now: Instant) {
        if frame.len() < MIN_FRAME {
            self.runts.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dst: Mac = frame[0..6].try_into().unwrap_or([0xFF; 6]);
        let src: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        let ports = lock(&self.ports).clone();
        let Some(Some(ingress)) = ports.get(from) else {
            return;
        };
        match ingress.mac {
            Some(own) if src != own => {
                self.refuse_source(ingress, src, "is not the NIC's own");
                return;
            }
            // An open port learns unicast sources only (a multicast source is
            // invalid, 802.3 §3.2.3), and never a MAC bound to a NIC.
            None if src[0] & 1 == 0 => {
                let mut table = self.table();
                if table.get(src).is_some_and(Entry::bound) {
                    drop(table);
                    self.refuse_source(ingress, src, "belongs to a guest NIC");
                    return;
                }
                let (evicted, aged) = table.learn(src, from, now);
                drop(table);
                self.evicted.fetch_add(evicted, Ordering::Relaxed);
                self.aged_out.fetch_add(aged, Ordering::Relaxed);
            }
            Some(_) | None => {}
        }
        let known = if dst[0] & 1 == 0 {
            let (port, aged) = self.table().lookup(dst, now);
            self.aged_out.fetch_add(u64::from(aged), Ordering::Relaxed);
            port
        } else {
            None
        };
        match known {
            Some(to) if to == from => {} // the destination is behind the ingress port
            Some(to) => {
                if let Some(Some(p)) = ports.get(to) {
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                    self.deliver(&ports, from, p, frame.to_vec());
                }
            }
            None => {
                if !lock(&ingress.flood).take(now) {
                    self.flood_limited.fetch_add(1, Ordering::Relaxed);
                    Self::count_drop(
                        ingress,
                        PortDrop::FloodBudget,
                        "broadcast, multicast or unknown destination beyond the flood budget",
                    );
                    return;
                }
                self.flooded.fetch_add(1, Ordering::Relaxed);
                for (i, p) in ports.iter().enumerate() {
                    let Some(p) = p else { continue };
                    if i != from {
                        self.deliver(&ports, from, p, frame.to_vec());
                    }
                }
            }
        }
    }

    #[must_use]
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        [
            ("forwarded", self.forwarded.load(Ordering::Relaxed)),
            ("flooded", self.flooded.load(Ordering::Relaxed)),
            ("dropped_queue_full", self.dropped.load(Ordering::Relaxed)),
            ("runts", self.runts.load(Ordering::Relaxed)),
            ("dropped_forged_source", self.forged.load(Ordering::Relaxed)),
            ("mac_evicted", self.evicted.load(Ordering::Relaxed)),
            ("mac_aged_out", self.aged_out.load(Ordering::Relaxed)),
            (
                "dropped_flood_budget",
                self.flood_limited.load(Ordering::Relaxed),
            ),
            ("ports", self.port_count() as u64),
        ]
        .into_iter()
        .collect()
    }

    /// Each port's drops, in port order (`switch_ports` in the stats JSON).
    #[must_use]
    pub fn port_reports(&self) -> Vec<SwitchPortReport> {
        lock(&self.ports)
            .iter()
            .flatten()
            .map(|p| SwitchPortReport {
                name: p.name.clone(),
                mac: p.mac.map(fmt_mac),
                dropped: p.drops.snapshot(),
                inbox_dropped: p.inbox_dropped.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00, 1, 2, 3]);
        f
    }

    const A: Mac = [2, 0, 0, 0, 0, 0xA];
    const B: Mac = [2, 0, 0, 0, 0, 0xB];
    const BCAST: Mac = [0xFF; 6];

    #[test]
    fn unknown_floods_then_learned_goes_direct() {
        let s = Switch::default();
        let (_, pa) = s.add_port("a").unwrap();
        let (_, pb) = s.add_port("b").unwrap();
        let (_, pc) = s.add_port("c").unwrap();
        s.send(0, &frame(B, A)); // B unknown: flood to b and c
        assert_eq!((pa.pending(), pb.pending(), pc.pending()), (0, 1, 1));
        s.send(1, &frame(A, B)); // A learned on port 0: only a
        assert_eq!((pa.pending(), pb.pending(), pc.pending()), (1, 1, 1));
        s.send(0, &frame(B, A)); // B learned on port 1 now
        assert_eq!(pb.pending(), 2);
        assert_eq!(pc.pending(), 1);
        assert_eq!(pa.pop().unwrap(), frame(A, B));
        assert_eq!(s.forwarded.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_direct_port_runs_its_owners_work_on_the_senders_thread() {
        let s = Switch::default();
        let (_, _pa) = s.add_port("a").unwrap();
        let (_, pb) = s.add_port("b").unwrap();
        let ran = Arc::new(AtomicU64::new(0));
        let (r, p) = (ran.clone(), pb.clone());
        // The owner's work: take what arrived (here: count and drop it).
        pb.set_direct(Some(Arc::new(move || {
            while p.pop().is_some() {
                r.fetch_add(1, Ordering::Relaxed);
            }
        })));
        for _ in 0..5 {
            s.send(0, &frame(B, A));
        }
        assert_eq!(
            ran.load(Ordering::Relaxed),
            5,
            "every frame, on this thread"
        );
        assert_eq!(pb.pending(), 0);
        assert!(pb.ready.read().is_err(), "no wake-up of the owner");
        pb.set_direct(None);
        s.send(0, &frame(B, A));
        assert_eq!(pb.pending(), 1);
        assert_eq!(pb.ready.read().unwrap(), 1, "back to waking the owner");
    }

    #[test]
    fn broadcast_floods_and_multicast_source_is_not_learned() {
        let s = Switch::default();
        let (_, pa) = s.add_port("a").unwrap();
        let (_, pb) = s.add_port("b").unwrap();
        s.send(1, &frame(BCAST, [3, 0, 0, 0, 0, 1]));
        assert_eq!((pa.pending(), pb.pending()), (1, 0));
        s.send(0, &frame([3, 0, 0, 0, 0, 1], A));
        assert_eq!(pb.pending(), 1, "multicast destination floods");
    }

    const C: Mac = [2, 0, 0, 0, 0, 0xC];
    const HOST: Mac = [2, 0, 0, 0, 0, 0x11];

    fn forged(s: &Switch) -> u64 {
        s.forged.load(Ordering::Relaxed)
    }

    /// Client `A`, server `B`, a third guest `C` that attacks.
    fn three_nics(s: &Switch) -> [Arc<Port>; 3] {
        [A, B, C].map(|m| s.add_nic_port(&format!("{m:?}"), m).unwrap().1)
    }

    #[test]
    fn a_removed_port_frees_its_number_and_its_mac() {
        let s = Switch::default();
        let [pa, _pb, pc] = three_nics(&s);
        assert_eq!(s.port_count(), 3);
        s.remove_port(1);
        s.remove_port(1); // twice is harmless
        assert_eq!(s.port_count(), 2);
        // B's MAC is free: frames to it flood to the ports left, none lost to a dead one.
        s.send(0, &frame(B, A));
        assert_eq!(pc.pending(), 1);
        assert_eq!(s.flooded.load(Ordering::Relaxed), 1);
        // A NIC's port found by its MAC goes the same way.
        s.remove_nic_port(C);
        assert_eq!(s.port_count(), 1);
        // New NICs take the free numbers, lowest first, and may bind B and C again.
        let (ic, pc) = s.add_nic_port("C2", C).unwrap();
        let (ib, pb2) = s.add_nic_port("B2", B).unwrap();
        assert_eq!((ic, ib, s.port_count()), (1, 2, 3));
        s.send(0, &frame(B, A));
        assert_eq!((pb2.pending(), pc.pending(), pa.pending()), (1, 0, 0));
    }

    #[test]
    fn a_nic_sends_only_from_its_own_mac() {
        let s = Switch::default();
        let [pa, pb, pc] = three_nics(&s);
        for src in [B, A, [3, 0, 0, 0, 0, 0xC], [0; 6], HOST] {
            s.send(2, &frame(BCAST, src));
            s.send(2, &frame(A, src));
        }
        assert_eq!((pa.pending(), pb.pending(), pc.pending()), (0, 0, 0));
        assert_eq!(forged(&s), 10);
        assert_eq!(pc.drops.count(PortDrop::ForgedSource), 10);
        assert_eq!(s.counters()["dropped_forged_source"], 10);
        // Its own frames still flow.
        s.send(2, &frame(A, C));
        s.send(2, &frame(BCAST, C));
        assert_eq!((pa.pending(), pb.pending(), pc.pending()), (2, 1, 0));
        assert_eq!(forged(&s), 10);
    }

    #[test]
    fn a_forged_source_does_not_divert_the_victims_traffic() {
        let s = Switch::default();
        let [pa, pb, pc] = three_nics(&s);
        // C poses as the server, then as the client.
        s.send(2, &frame(A, B));
        s.send(2, &frame(B, A));
        assert_eq!(forged(&s), 2);
        // The client's ping and the server's answer still reach only their target.
        s.send(0, &frame(B, A));
        s.send(1, &frame(A, B));
        assert_eq!((pa.pending(), pb.pending(), pc.pending()), (1, 1, 0));
        assert_eq!(pb.pop().unwrap(), frame(B, A));
        assert_eq!(pa.pop().unwrap(), frame(A, B));
        assert_eq!(s.flooded.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn frames_to_a_nic_never_flood_even_before_it_speaks() {
        let s = Switch::default();
        let [pa, pb, pc] = three_nics(&s);
        s.send(0, &frame(B, A));
        assert_eq!((pa.pending(), pb.pending(), pc.pending()), (0, 1, 0));
        assert_eq!(s.forwarded.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_tap_learns_host_macs_but_cannot_claim_a_nics() {
        let s = Switch::default();
        // The TAP comes first (as in the shim) and even speaks for B before B's
        // NIC exists: the NIC's binding still wins.
        let (tap, pt) = s.add_port("tap").unwrap();
        s.send(tap, &frame(BCAST, B));
        let [pa, pb, pc] = three_nics(&s); // ports 1, 2, 3
        assert_eq!(s.table().get(B).map(|e| e.port), Some(2));
        // Host addresses are learned from the TAP.
        s.send(tap, &frame(A, HOST));
        assert_eq!(pa.pop().unwrap(), frame(A, HOST));
        s.send(1, &frame(HOST, A));
        assert_eq!(pt.pop().unwrap(), frame(HOST, A));
        assert_eq!((pb.pending(), pc.pending()), (0, 0));
        // A frame from the TAP claiming B is dropped, and B's traffic stays B's.
        s.send(tap, &frame(BCAST, B));
        s.send(tap, &frame(A, B));
        assert_eq!(forged(&s), 2);
        assert_eq!(pt.drops.count(PortDrop::ForgedSource), 2);
        assert_eq!(pa.pending(), 0);
        s.send(1, &frame(B, A));
        assert_eq!((pb.pending(), pt.pending(), pc.pending()), (1, 0, 0));
        // And no guest can take a host address the TAP carries.
        s.send(3, &frame(A, HOST));
        assert_eq!(forged(&s), 3);
        s.send(1, &frame(HOST, A));
        assert_eq!((pt.pending(), pc.pending()), (1, 0));
    }

    #[test]
    fn a_flood_of_source_macs_from_the_tap_stays_bounded() {
        let s = Switch::default();
        let (tap, pt) = s.add_port("tap").unwrap();
        let (_, pa) = s.add_nic_port("a", A).unwrap();
        let mut t = Instant::now();
        for i in 0..10 * LEARNED_MAX as u32 {
            // Two broadcasts per 2 ms: well within the flood budget.
            t += Duration::from_millis(2);
            let mut mac = [2, 0x77, 0, 0, 0, 0];
            mac[2..].copy_from_slice(&i.to_be_bytes());
            s.send_at(tap, &frame(BCAST, mac), t);
            // One host keeps talking: it is never the least recently seen.
            s.send_at(tap, &frame(BCAST, HOST), t);
        }
        let table = s.table();
        assert!(table.learned <= LEARNED_MAX && table.learned >= LEARNED_MAX * 7 / 8);
        assert_eq!(table.learned, table.map.len() - 1, "plus A's binding");
        drop(table);
        let evicted = s.evicted.load(Ordering::Relaxed);
        assert_eq!(evicted as usize + s.table().learned, 10 * LEARNED_MAX + 1);
        assert_eq!(s.counters()["mac_evicted"], evicted);
        // The binding and the busy host survived.
        while pa.pop().is_some() {}
        while pt.pop().is_some() {}
        s.send_at(tap, &frame(A, HOST), t);
        s.send_at(1, &frame(HOST, A), t);
        assert_eq!((pa.pending(), pt.pending()), (1, 1));
        assert_eq!(s.flooded.load(Ordering::Relaxed), 20 * LEARNED_MAX as u64);
    }

    #[test]
    fn learned_macs_age_out_and_bound_ones_do_not() {
        let s = Switch::default();
        let (tap, pt) = s.add_port("tap").unwrap();
        let [pa, pb, pc] = three_nics(&s); // ports 1, 2, 3
        let t0 = Instant::now();
        s.send_at(tap, &frame(A, HOST), t0);
        assert_eq!(pa.pop().unwrap(), frame(A, HOST));
        s.send_at(
            1,
            &frame(HOST, A),
            t0 + AGEING.saturating_sub(Duration::from_secs(1)),
        );
        assert_eq!((pt.pending(), pb.pending(), pc.pending()), (1, 0, 0));
        // Silent for longer than the ageing time: forgotten, so frames flood.
        s.send_at(1, &frame(HOST, A), t0 + AGEING);
        assert_eq!((pt.pending(), pb.pending(), pc.pending()), (2, 1, 1));
        assert_eq!(s.counters()["mac_aged_out"], 1);
        assert_eq!(s.table().learned, 0);
        // A NIC's MAC never ages, even if it never speaks.
        s.send_at(1, &frame(B, A), t0 + AGEING * 10);
        assert_eq!((pb.pending(), pc.pending()), (2, 1));
    }

    #[test]
    fn a_mac_binds_to_one_nic_only() {
        let s = Switch::default();
        s.add_nic_port("a", A).unwrap();
        assert_eq!(
            s.add_nic_port("a2", A).err().map(|e| e.kind()),
            Some(std::io::ErrorKind::AlreadyExists)
        );
        assert!(s.add_nic_port("m", [3, 0, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn runts_and_full_queues_are_counted_not_fatal() {
        let s = Switch::default();
        let (_, _pa) = s.add_port("a").unwrap();
        let (_, pb) = s.add_port("b").unwrap();
        s.send(0, &[1, 2, 3]);
        assert_eq!(s.runts.load(Ordering::Relaxed), 1);
        s.send(1, &frame(A, B)); // learns B behind b: frames to it do not flood
        for _ in 0..PORT_QUEUE + 5 {
            s.send(0, &frame(B, A));
        }
        assert_eq!(pb.pending(), PORT_QUEUE);
        assert_eq!(pb.inbox_dropped.load(Ordering::Relaxed), 5);
        assert_eq!(s.counters()["dropped_queue_full"], 5);
    }

    /// Fills `p`'s inbox from `from` with frames `B <- src`, `n` of them, at `t`.
    fn fill(s: &Switch, from: usize, src: Mac, n: usize, t: Instant) {
        for _ in 0..n {
            s.send_at(from, &frame(B, src), t);
        }
    }

    #[test]
    fn a_full_inbox_drops_the_heaviest_senders_frames_not_a_light_senders() {
        let s = Switch::default();
        let [pa, pb, pc] = three_nics(&s);
        let t = Instant::now();
        // C floods B's inbox to the brim (unicast: no flood budget involved).
        fill(&s, 2, C, PORT_QUEUE + 100, t);
        assert_eq!(pb.pending(), PORT_QUEUE);
        assert_eq!(pc.drops.count(PortDrop::QueueFull), 100);
        // A's frames still get in, each at the cost of one of C's.
        fill(&s, 0, A, 10, t);
        assert_eq!(pb.pending(), PORT_QUEUE);
        assert_eq!(pa.drops.count(PortDrop::QueueFull), 0);
        assert_eq!(pc.drops.count(PortDrop::QueueFull), 110);
        assert_eq!(pb.inbox_dropped.load(Ordering::Relaxed), 110);
        // And they are served round robin, not after C's backlog.
        let first: Vec<Vec<u8>> = (0..20).filter_map(|_| pb.pop()).collect();
        let from_a = first.iter().filter(|f| f[6..12] == A).count();
        assert_eq!(from_a, 10, "A's 10 frames among the first 20 served");
        let _ = pa;
    }

    #[test]
    fn equal_shares_drop_the_arriving_frame() {
        let s = Switch::default();
        let [pa, pb, pc] = three_nics(&s);
        let t = Instant::now();
        fill(&s, 0, A, PORT_QUEUE / 2, t);
        fill(&s, 2, C, PORT_QUEUE / 2, t);
        // Full, shares equal: whoever sends next loses their own frame.
        fill(&s, 0, A, 3, t);
        fill(&s, 2, C, 4, t);
        assert_eq!(pa.drops.count(PortDrop::QueueFull), 3);
        assert_eq!(pc.drops.count(PortDrop::QueueFull), 4);
        assert_eq!(pb.pending(), PORT_QUEUE);
    }

    #[test]
    fn unpop_keeps_the_order_and_the_turn() {
        let s = Switch::default();
        let [_pa, pb, _pc] = three_nics(&s);
        let mut a1 = frame(B, A);
        a1.push(1);
        let mut a2 = frame(B, A);
        a2.push(2);
        s.send(0, &a1);
        s.send(0, &a2);
        s.send(2, &frame(B, C));
        let f = pb.pop().unwrap();
        assert_eq!(f, a1);
        pb.unpop(f);
        assert_eq!(pb.pending(), 3);
        assert_eq!(
            pb.pop().unwrap(),
            a1,
            "back at the head, served again first"
        );
        assert_eq!(
            pb.pop().unwrap(),
            frame(B, C),
            "then the other sender's turn"
        );
        assert_eq!(pb.pop().unwrap(), a2);
        assert_eq!(pb.pop(), None);
    }

    #[test]
    fn a_broadcast_storm_is_cut_at_the_ingress_by_the_flood_budget() {
        let s = Switch::default();
        let [pa, pb, pc] = three_nics(&s);
        let t0 = Instant::now();
        let burst = FLOOD_BURST as usize;
        // 10,000 broadcasts at one instant: the burst goes out, the rest not.
        for _ in 0..10_000 {
            s.send_at(2, &frame(BCAST, C), t0);
        }
        assert_eq!((pa.pending(), pb.pending()), (burst, burst));
        assert_eq!(pc.drops.count(PortDrop::FloodBudget), 10_000 - burst as u64);
        assert_eq!(s.counters()["dropped_flood_budget"], 10_000 - burst as u64);
        // The victims' unicast between each other is not charged to any budget
        // and finds room in spite of the storm's frames waiting.
        s.send_at(0, &frame(B, A), t0);
        assert_eq!(pb.pending(), burst + 1);
        // A second later the budget has refilled by the rate, up to the burst.
        let t1 = t0 + Duration::from_secs(1);
        let mut sent = 0;
        for _ in 0..10_000 {
            s.send_at(2, &frame(BCAST, C), t1);
            sent += 1;
        }
        let through = FLOOD_RATE.min(FLOOD_BURST) as usize;
        assert_eq!(pa.pending(), burst + through);
        assert_eq!(
            pc.drops.count(PortDrop::FloodBudget),
            20_000 - (burst + through) as u64
        );
        assert_eq!(sent, 10_000);
        // A's own budget is untouched: its broadcast still floods.
        s.send_at(0, &frame(BCAST, A), t1);
        assert_eq!(pc.pending(), 1);
        assert_eq!(pa.drops.count(PortDrop::FloodBudget), 0);
    }

    #[test]
    fn the_flood_budget_refills_at_its_rate() {
        let mut b = FloodBudget::default();
        let t0 = Instant::now();
        let burst = FLOOD_BURST as usize;
        assert_eq!((0..burst + 10).filter(|_| b.take(t0)).count(), burst);
        // 10 ms later: FLOOD_RATE / 100 tokens.
        let t1 = t0 + Duration::from_millis(10);
        let expect = FLOOD_RATE as usize / 100;
        assert_eq!((0..burst).filter(|_| b.take(t1)).count(), expect);
    }

    #[test]
    fn port_reports_name_each_ports_drops_by_reason() {
        let s = Switch::default();
        let (_, _pt) = s.add_port("tap").unwrap();
        let [_pa, _pb, _pc] = three_nics(&s);
        let t = Instant::now();
        s.send_at(3, &frame(A, B), t); // C forges B
        fill(&s, 3, C, PORT_QUEUE + 1, t);
        let r = s.port_reports();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].mac, None);
        assert_eq!(r[3].mac.as_deref(), Some("02:00:00:00:00:0c"));
        assert_eq!(r[3].dropped.get("forged_source"), Some(&1));
        assert_eq!(r[3].dropped.get("queue_full"), Some(&1));
        assert_eq!(r[2].inbox_dropped, 1);
        assert!(r[1].dropped.is_empty());
    }
}
