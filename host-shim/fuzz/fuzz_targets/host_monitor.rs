//! The doorbell monitor's consumer as the shim runs it (`RingTask::serve`):
//! a para region planned and published as for a real guest, one device
//! with two queues behind it, and the guest's stores anywhere in the
//! guest-writable part of the ring (slots, tail, overflow set, kicked word)
//! between the monitor's passes.
//!
//! Input: 17-byte operations: kind, offset (u64), value (u64).
#![no_main]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use host_shim::mech::doorbell::manager::{ParaRegion, Request, plan};
use host_shim::mech::doorbell::monitor::RingTask;
use host_shim::mech::doorbell::{GuestDoorbells, Target};
use libfuzzer_sys::fuzz_target;
use para_abi::doorbell::SourceType;
use para_abi::doorbell::designation::ANY_SOURCE;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

fuzz_target!(|data: &[u8]| {
    let request = Request {
        source: SourceType::GuestVcpu,
        source_id: ANY_SOURCE,
        host_cpu: 0,
    };
    let Ok(plan) = plan(&[request]) else { return };
    let Ok(region) = ParaRegion::new(plan) else {
        return;
    };
    let region = Arc::new(region);
    let queue = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let guest = Arc::new(GuestDoorbells::new(
        "fuzz",
        vec![Target {
            device: 1,
            queues: vec![queue(), queue()],
            inline: None,
        }],
    ));
    let Ok(mut task) = RingTask::new(region.clone(), 0, guest.clone()) else {
        return;
    };
    let d = region.plan.designations[0];
    for op in data.chunks_exact(17).take(256) {
        let offset = u64::from_le_bytes(op[1..9].try_into().unwrap());
        let value = u64::from_le_bytes(op[9..17].try_into().unwrap());
        if op[0] % 4 == 0 {
            let handled = task.serve(usize::from(op[1]) + 1);
            // Bounded: a batch of records and one pass over the overflow set.
            assert!(
                handled <= usize::from(op[1]) + 1 + 64 * 64,
                "served {handled}"
            );
        } else {
            let span = d.range_len - u64::from(d.protected_len);
            let _ = region.fuzz_guest_store(0, u64::from(d.protected_len) + offset % span, value);
        }
    }
    let _ = task.serve(1024);
    let _ = guest.counters.events.load(Ordering::Relaxed);
});
