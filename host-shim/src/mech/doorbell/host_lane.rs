//! Host-side producers of M1 events. Other host threads — whichever thread
//! the switch hands a guest's frames on (the TAP reader, another guest's vCPU
//! or monitor) — post an event to the monitor that serves the guest, through
//! the guest's range designated for their own source type
//! ([`SourceType::HostCpu`]), whose ring lies in the protected portion the
//! guest cannot write (reference text claims 2 and 6). The monitor consumes
//! it with the guest's vCPU ranges and does the queue work itself (run to
//! completion): the posting thread neither does that work nor wakes a
//! device thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use para_abi::doorbell::{Event, SourceType};
use vmm_sys_util::eventfd::EventFd;

use super::manager::ParaRegion;

/// The producer end of one host-written range.
pub struct HostLane {
    region: Arc<ParaRegion>,
    index: usize,
    /// The range's eventfd, which its monitor sleeps on when parked.
    kick: EventFd,
    /// Events posted, and of those the ones that had to wake a parked monitor.
    pub posted: AtomicU64,
    pub kicks: AtomicU64,
}

impl HostLane {
    /// The producer end of `region`'s first range designated for `source`;
    /// `None` when it has none (or `source` is the guest's own).
    #[must_use]
    pub fn open(region: &Arc<ParaRegion>, source: SourceType) -> Option<Self> {
        if source == SourceType::GuestVcpu {
            return None;
        }
        let index = region
            .plan
            .designations
            .iter()
            .position(|d| d.source == source)?;
        let kick = region.kicks.get(index)?.try_clone().ok()?;
        Some(Self {
            region: region.clone(),
            index,
            kick,
            posted: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
        })
    }

    /// The host CPU whose monitor consumes the range.
    #[must_use]
    pub fn host_cpu(&self) -> u32 {
        self.region.plan.designations[self.index].host_cpu
    }

    /// Posts `event` (a full ring coalesces it into the overflow set, as for
    /// a guest's) and wakes the monitor if it was parked.
    pub fn post(&self, event: Event) {
        let Some(ring) = self.region.ring(self.index) else {
            return;
        };
        let sent = ring.send(event);
        self.posted.fetch_add(1, Ordering::Relaxed);
        if sent.kick {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            let _ = self.kick.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mech::doorbell::manager::{Request, plan};
    use crate::mech::doorbell::monitor::RingTask;
    use crate::mech::doorbell::{CallTarget, GuestDoorbells};
    use para_abi::doorbell::Op;
    use para_abi::doorbell::designation::ANY_SOURCE;

    fn region() -> Arc<ParaRegion> {
        let req = |source| Request {
            source,
            source_id: ANY_SOURCE,
            host_cpu: 1,
        };
        let p = plan(&[req(SourceType::GuestVcpu), req(SourceType::HostCpu)]).unwrap();
        Arc::new(ParaRegion::new(p).unwrap())
    }

    #[test]
    fn the_host_range_is_read_only_to_the_guest_and_has_no_kick() {
        let r = region();
        let d = r.plan.designations[1];
        assert_eq!(d.source, SourceType::HostCpu);
        assert_eq!(d.kick_gpa, 0);
        assert!(r.kick_at(0).is_none());
        // Every byte of the host range lies in a read-only slot.
        let start = d.range_gpa - r.plan.base;
        let end = start + d.range_len;
        assert!(
            r.plan
                .slots
                .iter()
                .any(|s| s.readonly && s.offset <= start && end <= s.offset + s.len),
            "{:?}",
            r.plan.slots
        );
        assert!(HostLane::open(&r, SourceType::GuestVcpu).is_none());
        assert!(HostLane::open(&r, SourceType::Device).is_none());
    }

    #[test]
    fn a_guest_store_into_the_host_range_is_refused_and_nothing_is_consumed() {
        use crate::platform::MmioDevice;
        let r = region();
        let guest = Arc::new(GuestDoorbells::new("g", Vec::new()));
        let m = crate::mech::doorbell::ParaMmio {
            region: r.clone(),
            guest: guest.clone(),
        };
        let d = r.plan.designations[1];
        // The read-only slot makes every store an MMIO exit: the status words,
        // the ring header and a slot, all refused.
        for off in [0, 64, 64 + 256, d.range_len - 8] {
            assert!(m.mmio_write(d.range_gpa + off, &[0xFF; 8]));
        }
        assert_eq!(guest.snapshot().protected_writes, 4);
        let mut task = RingTask::new(r.clone(), 1, guest.clone()).unwrap();
        assert_eq!(task.serve(64), 0);
        assert_eq!(guest.snapshot().host_events, 0);
    }

    #[test]
    fn posted_events_run_on_the_monitor_and_a_parked_one_is_woken() {
        let r = region();
        let lane = HostLane::open(&r, SourceType::HostCpu).unwrap();
        assert_eq!(lane.host_cpu(), 1);
        let runs = Arc::new(AtomicU64::new(0));
        let seen = runs.clone();
        let guest = Arc::new(
            GuestDoorbells::new("g", Vec::new()).with_calls(vec![CallTarget {
                device: 5,
                queues: 2,
                call: Arc::new(move |q| {
                    seen.fetch_add(u64::from(q) + 1, Ordering::Relaxed);
                    q < 2
                }),
            }]),
        );
        let mut task = RingTask::new(r.clone(), 1, guest.clone()).unwrap();
        for _ in 0..3 {
            lane.post(Event::new(5, 0, Op::Notify));
        }
        lane.post(Event::new(5, 1, Op::Notify));
        assert_eq!(task.serve(64), 4);
        assert_eq!(runs.load(Ordering::Relaxed), 3 + 2);
        let s = guest.snapshot();
        // Host events, not the guest's notifications.
        assert_eq!((s.events, s.host_events), (0, 4));
        // Parked: the next post kicks the range's eventfd, counted as a host
        // kick, not as a guest's trapping one.
        assert!(task.park_for_test());
        lane.post(Event::new(5, 0, Op::Notify));
        assert_eq!(lane.kicks.load(Ordering::Relaxed), 1);
        task.count_kicks_for_test();
        let s = guest.snapshot();
        assert_eq!((s.fallback_kicks, s.host_kicks), (0, 1));
        assert_eq!(lane.posted.load(Ordering::Relaxed), 5);
    }
}
