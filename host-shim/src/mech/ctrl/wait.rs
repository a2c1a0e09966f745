//! M4's exitless wait, host half (`para_abi::ctrl::wait`): a guest vCPU that
//! stored a valid request into the read-only wait page is held on its own
//! thread, after the MMIO exit, until its NIC 0 receive queue has work, it is
//! kicked, or its timeout passes; then it resumes in ring 3 after the store.
//!
//! The MMIO handler runs on the exiting vCPU's thread and leaves the request in
//! a thread-local ([`post`]); the control blocks' exit hook on the same thread
//! takes it ([`take`]) and blocks ([`Waits::block`]). So the vCPU a wait holds
//! is the one that stored, whatever offset or value it wrote: a guest cannot
//! park another vCPU.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use para_abi::ctrl::wait::{self, Request};

use crate::vcpu::handle::{VcpuShared, Woken};

thread_local! {
    /// The request the last MMIO exit of this (vCPU) thread stored.
    static PENDING: Cell<Option<Request>> = const { Cell::new(None) };
}

/// Leaves a validated request for this thread's exit hook.
pub fn post(r: Request) {
    PENDING.with(|p| p.set(Some(r)));
}

/// The request this thread's last exit posted, once.
#[must_use]
pub fn take() -> Option<Request> {
    PENDING.with(Cell::take)
}

/// The wait's counters (`ctrl.wait` in the stats JSON).
#[derive(Debug, Default)]
pub struct WaitCounters {
    /// Requests taken (one MMIO exit each).
    pub waits: AtomicU64,
    /// Returned without sleeping: work had come since the guest looked.
    pub ready: AtomicU64,
    /// Woken by RX work or a kick.
    pub woken: AtomicU64,
    /// Ended by the timeout (the guest's, or the shim's bound).
    pub timeouts: AtomicU64,
    /// Nanoseconds vCPU threads spent held.
    pub held_ns: AtomicU64,
    /// RX batches announced (bumps of the sequence).
    pub rx_batches: AtomicU64,
    /// Requests that carried NIC 0's TX notification.
    pub tx_carried: AtomicU64,
}

/// One guest's waits.
#[derive(Debug, Default)]
pub struct Waits {
    vcpus: OnceLock<Vec<Arc<VcpuShared>>>,
    pub counters: WaitCounters,
}

impl Waits {
    /// The guest's vCPUs, once they exist (the ones RX work wakes).
    pub fn set_vcpus(&self, v: &[Arc<VcpuShared>]) {
        let _ = self.vcpus.set(v.to_vec());
    }

    /// NIC 0 put frames in the RX used ring: moves `seq` (the wait page's
    /// sequence) and wakes every held vCPU of the guest.
    pub fn rx_work(&self, seq: &AtomicU64) {
        // SeqCst pairs with the parker's own: a waiter either sees the new
        // sequence in its check or is parked when the unpark looks.
        seq.fetch_add(1, Ordering::SeqCst);
        self.counters.rx_batches.fetch_add(1, Ordering::Relaxed);
        for v in self.vcpus.get().map_or(&[][..], Vec::as_slice) {
            v.park.unpark();
        }
    }

    /// Holds `vcpu`'s thread for request `r`. `seq` is the wait page's
    /// sequence; `kicked` reads the vCPU's `immediate_exit` (a kick made
    /// since the exit: an upcall to inject, a stop, a quantum).
    pub fn block(
        &self,
        vcpu: &VcpuShared,
        r: Request,
        seq: &AtomicU64,
        kicked: impl Fn() -> bool,
        stopping: bool,
    ) -> Woken {
        let c = &self.counters;
        c.waits.fetch_add(1, Ordering::Relaxed);
        let bound = r
            .timeout_us
            .unwrap_or(wait::NO_DEADLINE)
            .min(wait::MAX_BLOCK_US);
        let start = Instant::now();
        let deadline = start + Duration::from_micros(u64::from(bound));
        let woken = vcpu.park.park_until(deadline, || {
            stopping || kicked() || seq.load(Ordering::SeqCst) as u32 != r.token
        });
        match woken {
            Woken::Ready => c.ready.fetch_add(1, Ordering::Relaxed),
            Woken::Unparked => c.woken.fetch_add(1, Ordering::Relaxed),
            Woken::Timeout => c.timeouts.fetch_add(1, Ordering::Relaxed),
        };
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        c.held_ns.fetch_add(ns, Ordering::Relaxed);
        woken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(token: u32, us: u32) -> Request {
        Request {
            token,
            timeout_us: Some(us),
            tx: false,
        }
    }

    #[test]
    fn a_stale_token_returns_at_once_and_the_timeout_bounds_the_hold() {
        let w = Waits::default();
        let v = Arc::new(VcpuShared::new(0));
        w.set_vcpus(std::slice::from_ref(&v));
        let seq = AtomicU64::new(5);
        assert_eq!(
            w.block(&v, req(4, 1_000_000), &seq, || false, false),
            Woken::Ready
        );
        assert_eq!(
            w.block(&v, req(5, 2_000), &seq, || false, false),
            Woken::Timeout
        );
        assert_eq!(
            w.block(&v, req(5, 1_000_000), &seq, || true, false),
            Woken::Ready
        );
        assert_eq!(
            w.block(&v, req(5, 1_000_000), &seq, || false, true),
            Woken::Ready
        );
        assert_eq!(w.counters.waits.load(Ordering::Relaxed), 4);
        assert_eq!(w.counters.ready.load(Ordering::Relaxed), 3);
        assert_eq!(w.counters.timeouts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rx_work_and_kicks_wake_a_held_vcpu_and_none_is_lost() {
        let w = Arc::new(Waits::default());
        let v = Arc::new(VcpuShared::new(0));
        w.set_vcpus(std::slice::from_ref(&v));
        let seq = Arc::new(AtomicU64::new(0));
        // Many rounds: the waker races the sleeper's check every time; a lost
        // wake-up would show as a 10 s timeout.
        for round in 0..200u32 {
            let (w2, seq2) = (w.clone(), seq.clone());
            let waker = std::thread::spawn(move || w2.rx_work(&seq2));
            let r = w.block(&v, req(round, 10_000_000), &seq, || false, false);
            waker.join().unwrap();
            assert_ne!(r, Woken::Timeout, "round {round}");
        }
        let v2 = v.clone();
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            v2.park.unpark();
        });
        let r = w.block(&v, req(200, 10_000_000), &seq, || false, false);
        kicker.join().unwrap();
        assert_eq!(r, Woken::Unparked);
        assert_eq!(w.counters.timeouts.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_shims_bound_caps_a_request_without_deadline() {
        const { assert!(wait::MAX_BLOCK_US <= wait::MAX_TIMEOUT_US) };
        let w = Waits::default();
        let v = VcpuShared::new(0);
        let seq = AtomicU64::new(0);
        let t = Instant::now();
        let r = Request {
            token: 0,
            timeout_us: None,
            tx: false,
        };
        assert_eq!(w.block(&v, r, &seq, || false, false), Woken::Timeout);
        assert!(t.elapsed() >= Duration::from_micros(u64::from(wait::MAX_BLOCK_US)));
    }
}
