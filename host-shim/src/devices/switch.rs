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

use crate::sync::lock;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::loglimit::LogLimit;

/// Frames queued per port before new ones are dropped (and counted).
pub const PORT_QUEUE: usize = 512;
/// Smallest frame carrying Ethernet addresses and type.
pub const MIN_FRAME: usize = 14;
/// Learned (not bound) MACs the table holds at most; at the cap the least
/// recently seen eighth is evicted at once, so a flood pays for one pass per
/// `LEARNED_MAX / 8` new MACs.
pub const LEARNED_MAX: usize = 1024;
/// A learned MAC not seen for this long is forgotten (802.1D's default ageing time).
pub const AGEING: Duration = Duration::from_mins(5);

pub type Mac = [u8; 6];

/// One switch port's inbox; its owner waits on `ready`.
pub struct Port {
    pub name: String,
    /// The one source MAC a guest NIC's port may send from; `None` for an open port.
    pub mac: Option<Mac>,
    inbox: Mutex<VecDeque<Vec<u8>>>,
    pub ready: EventFd,
    pub dropped: AtomicU64,
    /// Frames from this port refused for their source MAC.
    pub forged: AtomicU64,
    /// Run on the sender's thread after a frame lands in the inbox (the
    /// owner's RX work, run to completion); unset: `ready` wakes the owner.
    direct: std::sync::RwLock<Option<DirectRx>>,
}

/// See [`Port::set_direct`].
pub type DirectRx = Arc<dyn Fn() + Send + Sync>;

impl Port {
    /// Takes the next frame for this port.
    pub fn pop(&self) -> Option<Vec<u8>> {
        lock(&self.inbox).pop_front()
    }

    /// Puts a frame back at the head (the NIC had no buffer for it).
    pub fn unpop(&self, frame: Vec<u8>) {
        lock(&self.inbox).push_front(frame);
    }

    #[must_use]
    pub fn pending(&self) -> usize {
        lock(&self.inbox).len()
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
    log: LogLimit,
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
            dropped: AtomicU64::new(0),
            forged: AtomicU64::new(0),
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

    fn deliver(&self, port: &Port, frame: Vec<u8>) {
        let mut q = lock(&port.inbox);
        if q.len() >= PORT_QUEUE {
            port.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(frame);
        drop(q);
        match port.direct() {
            Some(run) => run(),
            None => {
                let _ = port.ready.write(1);
            }
        }
    }

    /// Counts and (rate-limited) logs a frame dropped for its source MAC.
    fn refuse_source(&self, port: &Port, src: Mac, why: &str) {
        port.forged.fetch_add(1, Ordering::Relaxed);
        self.forged.fetch_add(1, Ordering::Relaxed);
        crate::guest_log!(
            warn,
            limit = self.log,
            port = %port.name,
            source = %fmt_mac(src),
            "switch dropped a frame: {why}"
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
                self.refuse_source(ingress, src, "source MAC is not the NIC's own");
                return;
            }
            // An open port learns unicast sources only (a multicast source is
            // invalid, 802.3 §3.2.3), and never a MAC bound to a NIC.
            None if src[0] & 1 == 0 => {
                let mut table = self.table();
                if table.get(src).is_some_and(Entry::bound) {
                    drop(table);
                    self.refuse_source(ingress, src, "source MAC belongs to a guest NIC");
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
                    self.deliver(p, frame.to_vec());
                }
            }
            None => {
                self.flooded.fetch_add(1, Ordering::Relaxed);
                for (i, p) in ports.iter().enumerate() {
                    let Some(p) = p else { continue };
                    if i != from {
                        self.deliver(p, frame.to_vec());
                    }
                }
            }
        }
    }

    #[must_use]
    pub fn counters(&self) -> std::collections::BTreeMap<&'static str, u64> {
        [
            ("forwarded", self.forwarded.load(Ordering::Relaxed)),
            ("flooded", self.flooded.load(Ordering::Relaxed)),
            ("dropped_queue_full", self.dropped.load(Ordering::Relaxed)),
            ("runts", self.runts.load(Ordering::Relaxed)),
            ("dropped_forged_source", self.forged.load(Ordering::Relaxed)),
            ("mac_evicted", self.evicted.load(Ordering::Relaxed)),
            ("mac_aged_out", self.aged_out.load(Ordering::Relaxed)),
            ("ports", self.port_count() as u64),
        ]
        .into_iter()
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
        assert_eq!(pc.forged.load(Ordering::Relaxed), 10);
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
        assert_eq!(pt.forged.load(Ordering::Relaxed), 2);
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
            t += Duration::from_micros(1);
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
        for _ in 0..PORT_QUEUE + 5 {
            s.send(0, &frame(BCAST, A));
        }
        assert_eq!(pb.pending(), PORT_QUEUE);
        assert_eq!(pb.dropped.load(Ordering::Relaxed), 5);
    }
}
