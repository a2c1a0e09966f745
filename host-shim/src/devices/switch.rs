//! An in-process L2 learning switch between the guests' NICs (and an optional TAP).
//!
//! Learning per IEEE 802.1D §7.8: the source MAC of every frame is bound to its
//! ingress port; frames to a known unicast MAC go to that port, all others flood.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Frames queued per port before new ones are dropped (and counted).
pub const PORT_QUEUE: usize = 512;
/// Smallest frame carrying Ethernet addresses and type.
pub const MIN_FRAME: usize = 14;

pub type Mac = [u8; 6];

/// One switch port's inbox; its owner waits on `ready`.
pub struct Port {
    pub name: String,
    inbox: Mutex<VecDeque<Vec<u8>>>,
    pub ready: EventFd,
    pub dropped: AtomicU64,
}

impl Port {
    /// Takes the next frame for this port.
    pub fn pop(&self) -> Option<Vec<u8>> {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }

    /// Puts a frame back at the head (the NIC had no buffer for it).
    pub fn unpop(&self, frame: Vec<u8>) {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_front(frame);
    }

    #[must_use]
    pub fn pending(&self) -> usize {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[derive(Default)]
pub struct Switch {
    ports: Mutex<Vec<Arc<Port>>>,
    table: Mutex<HashMap<Mac, usize>>,
    pub forwarded: AtomicU64,
    pub flooded: AtomicU64,
    pub dropped: AtomicU64,
    pub runts: AtomicU64,
}

impl Switch {
    /// Adds a port; returns its index and handle.
    pub fn add_port(&self, name: &str) -> std::io::Result<(usize, Arc<Port>)> {
        let port = Arc::new(Port {
            name: name.to_owned(),
            inbox: Mutex::default(),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
            dropped: AtomicU64::new(0),
        });
        let mut ports = self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ports.push(port.clone());
        Ok((ports.len() - 1, port))
    }

    fn deliver(&self, port: &Port, frame: Vec<u8>) {
        let mut q = port
            .inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.len() >= PORT_QUEUE {
            port.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(frame);
        drop(q);
        let _ = port.ready.write(1);
    }

    /// Forwards `frame` that arrived on port `from`.
    pub fn send(&self, from: usize, frame: &[u8]) {
        if frame.len() < MIN_FRAME {
            self.runts.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dst: Mac = frame[0..6].try_into().unwrap_or([0xFF; 6]);
        let src: Mac = frame[6..12].try_into().unwrap_or([0; 6]);
        // Learn unicast sources only (a multicast source is invalid, 802.3 §3.2.3).
        if src[0] & 1 == 0 {
            self.table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(src, from);
        }
        let ports = self
            .ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let known = (dst[0] & 1 == 0)
            .then(|| {
                self.table
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&dst)
                    .copied()
            })
            .flatten();
        match known {
            Some(to) if to == from => {} // the destination is behind the ingress port
            Some(to) => {
                if let Some(p) = ports.get(to) {
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                    self.deliver(p, frame.to_vec());
                }
            }
            None => {
                self.flooded.fetch_add(1, Ordering::Relaxed);
                for (i, p) in ports.iter().enumerate() {
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
    fn broadcast_floods_and_multicast_source_is_not_learned() {
        let s = Switch::default();
        let (_, pa) = s.add_port("a").unwrap();
        let (_, pb) = s.add_port("b").unwrap();
        s.send(1, &frame(BCAST, [3, 0, 0, 0, 0, 1]));
        assert_eq!((pa.pending(), pb.pending()), (1, 0));
        s.send(0, &frame([3, 0, 0, 0, 0, 1], A));
        assert_eq!(pb.pending(), 1, "multicast destination floods");
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
