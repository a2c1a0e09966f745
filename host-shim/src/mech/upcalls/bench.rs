//! M3's test and comparison machinery: the upcall storm a guest asks for
//! (`UpcallStorm`: many posts at a fixed interval from a thread of their own),
//! and the poller of the naive `--upcalls poll` delivery, which kicks every
//! vCPU whose upcall waits for IF instead of asking KVM for the window exit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use para_abi::upcall::Class as UpcallClass;

use super::delivery::{GuestUpcalls, POLL_INTERVAL};
use super::report::Delivery;
use crate::vcpu::handle::VcpuShared;

/// Storms post at most this often (µs between posts may be 0 = back to back).
pub const STORM_INTERVAL_MAX_US: u32 = 1_000_000;

/// Starts a thread that posts `count` pings to vCPU `vcpu`, one every
/// `interval_us`, kicking it through `kick`. A guest has one storm thread at
/// most: `Ok(false)`, and nothing started, while its last one still runs.
pub fn start_storm(
    up: &Arc<GuestUpcalls>,
    vcpu: u32,
    count: u32,
    interval_us: u32,
    kick: Arc<VcpuShared>,
) -> std::io::Result<bool> {
    if up.storming.swap(true, Ordering::AcqRel) {
        return Ok(false);
    }
    let me = up.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("{}-storm", up.name))
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::Kind::Helper);
            storm(&me, vcpu, count, interval_us, &kick);
            me.storming.store(false, Ordering::Release);
        });
    match spawned {
        Ok(_) => Ok(true),
        Err(e) => {
            up.storming.store(false, Ordering::Release);
            Err(e)
        }
    }
}

fn storm(up: &GuestUpcalls, vcpu: u32, count: u32, interval_us: u32, kick: &VcpuShared) {
    let start = Instant::now();
    let step = Duration::from_micros(u64::from(interval_us));
    for i in 0..count {
        let due = start + step * i;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // Held across the kick: once `close` returns, no storm kicks a vCPU
        // thread that may have been joined.
        let closed = up.closed();
        if *closed {
            return;
        }
        up.post(vcpu, UpcallClass::Ping, 1, || kick.kick());
    }
}

/// On the polling path, starts the thread that kicks vCPUs whose upcalls
/// wait for IF, every [`POLL_INTERVAL`]; nothing on the other paths.
pub fn start_poller(up: &Arc<GuestUpcalls>, vcpus: Vec<Arc<VcpuShared>>) -> std::io::Result<()> {
    if up.delivery != Delivery::Poll {
        return Ok(());
    }
    let me = up.clone();
    std::thread::Builder::new()
        .name(format!("{}-upcall-poll", up.name))
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::Kind::Helper);
            loop {
                {
                    let closed = me.closed();
                    if *closed {
                        return;
                    }
                    for (s, v) in me.vcpus.iter().zip(&vcpus) {
                        if s.polled.load(Ordering::Relaxed) && s.pending.load(Ordering::Acquire) {
                            v.kick();
                        }
                    }
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        })
        .map(|_| ())
}
