//! Std-thread stress of the doorbell ring: many producers, one consumer that spins,
//! parks and is woken by kicks, exactly as a monitor thread would.
#![cfg(not(loom))]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use para_abi::doorbell::ring::{
    Consumer, Park, Pending, Polled, Ring, RingHeader, RingStatus, Via,
};
use para_abi::doorbell::{Event, Op};

/// The eventfd a kick writes: a counter and a condition variable.
#[derive(Default)]
struct Kick {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Kick {
    fn kick(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_one();
    }

    /// Sleeps until the counter is non-zero, then takes it. Panics after a long
    /// timeout: with producers still owing events that would be a lost wake-up.
    fn wait(&self) -> u64 {
        let mut count = self.count.lock().unwrap();
        while *count == 0 {
            let (c, timeout) = self
                .cv
                .wait_timeout(count, Duration::from_secs(20))
                .unwrap();
            count = c;
            assert!(
                !timeout.timed_out() || *count != 0,
                "lost wake-up: monitor never kicked"
            );
        }
        std::mem::take(&mut *count)
    }
}

struct Outcome {
    ring: Vec<Event>,
    pending: BTreeSet<(u8, u16)>,
    rejections: u64,
    sleeps: u64,
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
fn run(producers: u8, per_producer: u16, capacity: usize, spin: u32) {
    let status = RingStatus::new();
    let header = RingHeader::new();
    let slots: Vec<_> = (0..capacity).map(|_| AtomicU64::new(0)).collect();
    let ring = Ring::new(&status, &header, &slots).unwrap();
    let kick = Kick::default();
    let done = AtomicBool::new(false);

    let (sent, outcome, kicks) = std::thread::scope(|s| {
        let monitor = s.spawn(|| {
            let mut c = Consumer::new();
            let mut out = Outcome {
                ring: Vec::new(),
                pending: BTreeSet::new(),
                rejections: 0,
                sleeps: 0,
            };
            let mut idle = 0;
            loop {
                match c.poll(&ring) {
                    Polled::Event(e) => {
                        out.ring.push(e);
                        idle = 0;
                        continue;
                    }
                    Polled::Rejected(_) => out.rejections += 1,
                    Polled::Empty => {}
                }
                c.drain_overflow(&ring, |p| {
                    if let Pending::Event(e) = p {
                        out.pending.insert((e.device, e.queue));
                    }
                });
                if done.load(Ordering::Acquire) && !c.has_work(&ring) {
                    return out;
                }
                idle += 1;
                if idle < spin {
                    std::hint::spin_loop();
                    continue;
                }
                idle = 0;
                if c.park(&ring) == Park::Sleep {
                    out.sleeps += 1;
                    kick.wait();
                    c.unpark(&ring);
                }
            }
        });
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let ring = &ring;
                let kick = &kick;
                s.spawn(move || {
                    let mut sent = Vec::new();
                    let mut kicks = 0u64;
                    for i in 0..per_producer {
                        // Queue < 16 keeps every key exact in the overflow set; the
                        // argument numbers the event within its producer.
                        let e = Event {
                            device: p,
                            queue: i % 8,
                            op: Op::Notify,
                            arg: i,
                        };
                        let r = ring.send(e);
                        if r.kick {
                            kick.kick();
                            kicks += 1;
                        }
                        sent.push((e, r.via));
                    }
                    (sent, kicks)
                })
            })
            .collect();
        let mut sent = Vec::new();
        let mut kicks = 0;
        for h in handles {
            let (s, k) = h.join().unwrap();
            sent.push(s);
            kicks += k;
        }
        done.store(true, Ordering::Release);
        kick.kick();
        (sent, monitor.join().unwrap(), kicks)
    });

    assert_eq!(outcome.rejections, 0);
    let mut ring_total = 0;
    for (p, sent) in sent.iter().enumerate() {
        // Exactly the ring-path events of this producer, in its order.
        let expected: Vec<u16> = sent
            .iter()
            .filter(|(_, v)| matches!(v, Via::Ring(_)))
            .map(|(e, _)| e.arg)
            .collect();
        let got: Vec<u16> = outcome
            .ring
            .iter()
            .filter(|e| usize::from(e.device) == p)
            .map(|e| e.arg)
            .collect();
        assert_eq!(
            got, expected,
            "producer {p}: ring events lost, duplicated or reordered"
        );
        ring_total += expected.len();
        for (e, v) in sent {
            if *v == Via::Overflow {
                assert!(
                    outcome.pending.contains(&(e.device, e.queue)),
                    "overflowed {e:?} never drained"
                );
            }
        }
    }
    assert_eq!(outcome.ring.len(), ring_total);
    let total = usize::from(producers) * usize::from(per_producer);
    eprintln!(
        "{producers}x{per_producer} cap {capacity} spin {spin}: {ring_total}/{total} via ring, \
         {} keys drained from overflow, {} sleeps, {kicks} kicks",
        outcome.pending.len(),
        outcome.sleeps
    );
}

#[test]
fn many_producers_large_ring_spinning() {
    run(4, 50_000, 1024, 10_000);
}

#[test]
fn many_producers_tiny_ring_overflow_and_parking() {
    run(6, 20_000, 4, 16);
}

#[test]
fn parks_every_time() {
    // Spin budget 1: the monitor parks whenever the ring is empty, so nearly every
    // event races the park handshake.
    run(3, 20_000, 64, 1);
}
