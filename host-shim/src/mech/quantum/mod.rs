//! `--vcpu-quantum`: time slices for vCPU threads when more vCPUs than host CPUs
//! run; M3's window state informs the scheduling.
//!
//! Every quantum a ticker asks each running vCPU to give up its host CPU and
//! kicks it. The vCPU's thread honours the request at its next exit (the kick
//! makes one) with `sched_yield` — but only while the guest's interrupt window
//! is open. A vCPU in a stretch with IF = 0 (the guest's ring-0 core, a
//! spinlock held with interrupts off) is not descheduled there: the request is
//! deferred and counted, and where the vCPU takes upcalls the interrupt-window
//! request is armed so that KVM exits the moment the window opens; elsewhere
//! the first exit with IF = 1 ends the deferral.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use tracing::warn;

use crate::mech::{ExitCtx, Mechanism};
use crate::vcpu::handle::VcpuShared;

/// The shortest and longest quantum `--vcpu-quantum` accepts, in ms.
pub const MIN_MS: u64 = 1;
pub const MAX_MS: u64 = 1000;

/// Asks every vCPU of `vcpus` to yield once per `period`.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Ticker {
    pub fn start(period: Duration, vcpus: Vec<Arc<VcpuShared>>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("vcpu-quantum".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Helper);
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(period);
                    for v in &vcpus {
                        v.request_yield();
                    }
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the ticker (before the vCPU threads are joined: no kick after that).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            warn!("the vCPU quantum ticker panicked");
        }
    }
}

/// Whether the guest can be descheduled at this exit: IF = 1 and, where it takes
/// upcalls (so KVM can tell), not inside an interrupt shadow.
fn window_open(fd: &mut VcpuFd, takes_upcalls: bool) -> bool {
    let run = fd.get_kvm_run();
    run.if_flag != 0 && (run.ready_for_interrupt_injection != 0 || !takes_upcalls)
}

/// At an exit of `me`: yields the host CPU if a slice ended and the window is
/// open, else defers (counted once per request). Returns whether the
/// interrupt-window request must be armed for the deferred yield. Runs at every
/// exit, so without a pending request it is one load.
fn at_exit(fd: &mut VcpuFd, me: &VcpuShared, takes_upcalls: impl FnOnce() -> bool) -> bool {
    if !me.yield_requested.load(Ordering::Acquire) {
        return false;
    }
    let takes_upcalls = takes_upcalls();
    if window_open(fd, takes_upcalls) {
        me.yield_requested.store(false, Ordering::Release);
        me.yield_waiting.store(false, Ordering::Relaxed);
        me.preempted.fetch_add(1, Ordering::Relaxed);
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
        return false;
    }
    if !me.yield_waiting.swap(true, Ordering::Relaxed) {
        me.preempt_deferred.fetch_add(1, Ordering::Relaxed);
    }
    // Without upcalls the LAPIC may refuse ExtINT, so KVM would never report the
    // window open: wait for an exit with IF = 1 instead of arming the request.
    takes_upcalls
}

/// The quantum as a guest's mechanism: the yield at an exit. Nothing is
/// offered to the guest; the [`Ticker`] asks for the yields.
pub struct Quantum;

impl Mechanism for Quantum {
    fn name(&self) -> &'static str {
        "quantum"
    }

    fn after_exit(&self, cx: &mut ExitCtx<'_>) -> bool {
        let (vcpu, mechs) = (cx.vcpu, cx.mechs);
        at_exit(cx.fd, vcpu, || {
            mechs.iter().any(|m| m.takes_upcalls(vcpu.index))
        })
    }
}
