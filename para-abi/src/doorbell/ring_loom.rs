//! Model checks of the ring with loom: every interleaving (up to the preemption
//! bound) of several producers and the consumer.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p para-abi --release --lib`.

use std::vec::Vec;

use loom::sync::Arc;
use loom::sync::atomic::AtomicUsize;
use loom::thread;

use super::*;

struct Mem {
    status: RingStatus,
    header: RingHeader,
    slots: Vec<AtomicU64>,
}

impl Mem {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            status: RingStatus::new(),
            header: RingHeader::new(),
            slots: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn ring(&self) -> Ring<'_> {
        Ring::new(&self.status, &self.header, &self.slots).unwrap()
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// What the host saw: ring events and drained overflow keys.
#[derive(Default)]
struct Seen {
    ring: Vec<Event>,
    pending: Vec<Pending>,
}

impl Seen {
    /// One step of a monitor: poll once; when empty, drain the overflow set.
    fn step(&mut self, c: &mut Consumer, ring: &Ring<'_>) -> bool {
        match c.poll(ring) {
            Polled::Event(e) => {
                self.ring.push(e);
                true
            }
            Polled::Rejected(r) => panic!("legitimate producers produced a rejection: {r:?}"),
            Polled::Empty => {
                c.drain_overflow(ring, |p| {
                    self.pending.push(p);
                }) != 0
            }
        }
    }

    fn finish(&mut self, c: &mut Consumer, ring: &Ring<'_>) {
        while self.step(c, ring) {}
        // After the ring read empty once more, a last drain.
        while self.step(c, ring) {}
    }

    /// Every sent event was seen exactly once in the ring, or its key is pending.
    fn check(&self, sent: &[(Event, Sent)]) {
        let mut ring_sent: Vec<Event> = sent
            .iter()
            .filter(|(_, s)| matches!(s.via, Via::Ring(_)))
            .map(|(e, _)| *e)
            .collect();
        let mut ring_seen = self.ring.clone();
        ring_sent.sort_by_key(|e| (e.device, e.queue));
        ring_seen.sort_by_key(|e| (e.device, e.queue));
        assert_eq!(ring_seen, ring_sent, "ring events lost or duplicated");
        for (e, s) in sent {
            if s.via == Via::Overflow {
                assert!(
                    self.pending.contains(&Pending::Event(*e)),
                    "overflowed event {e:?} not pending"
                );
            }
        }
    }
}

/// Producer `p` sends `n` events with distinct keys (device p, queue i).
fn produce(mem: &Arc<Mem>, p: u8, n: u16) -> Vec<(Event, Sent)> {
    let ring = mem.ring();
    (0..n)
        .map(|i| {
            let e = Event::new(p, i, Op::Notify);
            (e, ring.send(e))
        })
        .collect()
}

/// Two producers × two events into a ring of two, a consumer running concurrently:
/// wrap-around (positions 2 and 3 reuse slots 0 and 1) and, when the consumer is
/// slow, overflow. Nothing lost, nothing duplicated.
#[test]
fn two_producers_wrap_and_overflow() {
    model(|| {
        let mem = Mem::new(2);
        let producers: Vec<_> = (0..2u8)
            .map(|p| {
                let mem = mem.clone();
                thread::spawn(move || produce(&mem, p, 2))
            })
            .collect();
        let consumer = {
            let mem = mem.clone();
            thread::spawn(move || {
                let ring = mem.ring();
                let mut c = Consumer::new();
                let mut seen = Seen::default();
                for _ in 0..3 {
                    seen.step(&mut c, &ring);
                }
                (c, seen)
            })
        };
        let sent: Vec<_> = producers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let (mut c, mut seen) = consumer.join().unwrap();
        seen.finish(&mut c, &mem.ring());
        seen.check(&sent);
    });
}

/// Three producers, one event each, ring of two: the third finds the ring full
/// unless the consumer made room in time.
#[test]
fn three_producers_overflow() {
    model(|| {
        let mem = Mem::new(2);
        let producers: Vec<_> = (0..3u8)
            .map(|p| {
                let mem = mem.clone();
                thread::spawn(move || produce(&mem, p, 1))
            })
            .collect();
        let ring = mem.ring();
        let mut c = Consumer::new();
        let mut seen = Seen::default();
        seen.step(&mut c, &ring);
        seen.step(&mut c, &ring);
        let sent: Vec<_> = producers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        seen.finish(&mut c, &ring);
        seen.check(&sent);
    });
}

/// The park/kick handshake: a consumer that drains, then parks, while producers
/// publish. If it goes to sleep with events still unconsumed, some producer must
/// have been told to kick (the kick is an eventfd write: counted, never lost).
/// `prefill` events are already in the ring when the producers start, so they
/// may find it full and take the overflow path.
fn park_model(producers: u8, capacity: usize, prefill: u16) {
    model(move || {
        let mem = Mem::new(capacity);
        let mut sent = produce(&mem, 15, prefill);
        let kicks = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let mem = mem.clone();
                let kicks = kicks.clone();
                thread::spawn(move || {
                    let sent = produce(&mem, p, 1);
                    if sent[0].1.kick {
                        kicks.fetch_add(1, Ordering::SeqCst);
                    }
                    sent
                })
            })
            .collect();
        let ring = mem.ring();
        let mut c = Consumer::new();
        let mut seen = Seen::default();
        loop {
            while seen.step(&mut c, &ring) {}
            match c.park(&ring) {
                Park::Sleep => break,
                Park::Retry => {}
            }
        }
        // The monitor now sleeps on its eventfd. Let the producers finish.
        sent.extend(handles.into_iter().flat_map(|h| h.join().unwrap()));
        if prefill == 0 && usize::from(producers) <= capacity {
            // Room for everyone: no interleaving may take the overflow path.
            assert!(sent.iter().all(|(_, s)| matches!(s.via, Via::Ring(_))));
        }
        let consumed = seen.ring.len() + seen.pending.len();
        if consumed < sent.len() {
            assert!(
                kicks.load(Ordering::SeqCst) > 0,
                "lost wake-up: monitor asleep, {} of {} events pending, no kick",
                sent.len() - consumed,
                sent.len()
            );
        }
        // Woken (or never needed): it unparks and finds everything.
        c.unpark(&ring);
        seen.finish(&mut c, &ring);
        seen.check(&sent);
    });
}

#[test]
fn park_kick_two_producers() {
    park_model(2, 2, 0);
}

#[test]
fn park_kick_with_full_ring() {
    // Capacity 2 and already full: a producer that still finds it full goes through
    // the overflow set, whose publication the park re-check must see as well.
    park_model(2, 2, 2);
}

/// Several park/wake cycles with the one-kick-per-park rule: the monitor sleeps,
/// wakes on a kick (`unpark` clears `kicked`), parks again. Whenever it sleeps with
/// events outstanding, a kick it has not consumed yet must exist.
#[test]
fn park_wake_cycles_with_kick_dedup() {
    model(|| {
        let mem = Mem::new(2);
        let kicks = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..2u8)
            .map(|p| {
                let (mem, kicks, done) = (mem.clone(), kicks.clone(), done.clone());
                thread::spawn(move || {
                    let sent = produce(&mem, p, 1);
                    if sent[0].1.kick {
                        kicks.fetch_add(1, Ordering::SeqCst);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    sent
                })
            })
            .collect();
        let ring = mem.ring();
        let mut c = Consumer::new();
        let mut seen = Seen::default();
        let mut taken = 0;
        'monitor: loop {
            while seen.step(&mut c, &ring) {}
            if c.park(&ring) == Park::Retry {
                continue;
            }
            // Asleep on the eventfd: only a kick wakes it.
            loop {
                let k = kicks.load(Ordering::SeqCst);
                if k > taken {
                    taken = k;
                    break;
                }
                if done.load(Ordering::SeqCst) == 2 && kicks.load(Ordering::SeqCst) == taken {
                    // Everyone finished (each kicked before counting itself done)
                    // and no kick is owed: the monitor would sleep for ever.
                    break 'monitor;
                }
                thread::yield_now();
            }
            c.unpark(&ring);
        }
        let sent: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(
            seen.ring.len() + seen.pending.len(),
            sent.len(),
            "lost wake-up: monitor asleep with events pending and no kick owed"
        );
        seen.check(&sent);
    });
}
