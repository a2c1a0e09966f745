//! The paravirtual mechanisms the shim offers a guest, each behind one trait,
//! [`Mechanism`]:
//!
//! - [`doorbell`] (M1): exitless doorbells in the para region, consumed by host
//!   monitor threads;
//! - [`hints`] (M2): a read-only page naming the vCPUs that share a host CPU
//!   with a device's I/O thread;
//! - [`upcalls`] (M3): the shim's events injected when the vCPU's interrupt
//!   window is open;
//! - [`ctrl`] (M4): shadowed control flags;
//! - [`vmq`] (M5): VM queues between guests;
//! - [`direct`]: ring pairs two guests share, set up by the shim, with no
//!   host thread in the per-frame path;
//! - [`quantum`]: time slices that wait for the interrupt window.
//!
//! A mechanism is built (its memory mapped, its threads started) by
//! `crate::assemble` and handed to the guest with `Guest::attach`, which
//! offers it in CPUID and routes its MMIO; the vCPU loop then reaches it only
//! through this trait: its hypercalls, the check before each entry, the hook
//! after each exit, and its part of the report.

pub mod ctrl;
pub mod direct;
pub mod doorbell;
pub mod hints;
pub mod quantum;
pub mod upcalls;
pub mod vmq;

use std::sync::Arc;

use kvm_ioctls::VcpuFd;
use para_abi::hypercall::{Call, Status};
pub use para_abi::upcall::Class as UpcallClass;

use crate::counters::MarkReport;
use crate::kvm::cpuid::Offer;
use crate::platform::{MmioDevice, Platform};
use crate::report::GuestReport;
use crate::vcpu::handle::VcpuShared;

/// Posts one guest-wide upcall of a class (M3) to the preferred vCPU when it
/// takes upcalls, else to the lowest one that does; the vCPU it went to, or
/// `None` (nothing posted) when none takes upcalls or the guest is ending. How
/// one mechanism announces something through another without naming it.
pub type Upcaller = Arc<dyn Fn(Option<u32>, UpcallClass) -> Option<u32> + Send + Sync>;

/// What a mechanism's hypercall handler may use, on the calling vCPU's thread.
pub struct CallCtx<'a> {
    pub fd: &'a VcpuFd,
    pub vcpu: &'a Arc<VcpuShared>,
    /// The guest's platform, to count a refused call among the guest's rejects.
    pub platform: &'a Platform,
    /// KVM's `exits` summed over the guest's vCPUs, read when called.
    pub kvm_exits: &'a dyn Fn() -> u64,
}

/// What a mechanism's exit hook may use, on the vCPU's thread between two
/// `KVM_RUN`s.
pub struct ExitCtx<'a> {
    pub fd: &'a mut VcpuFd,
    pub vcpu: &'a VcpuShared,
    /// The guest is stopping: this may be the vCPU's last exit.
    pub stopping: bool,
    /// The guest's mechanisms (whether this vCPU takes upcalls, for one).
    pub mechs: &'a [Arc<dyn Mechanism>],
}

/// One paravirtual mechanism attached to one guest. Every method but
/// [`Mechanism::name`] has a default that does nothing, so a mechanism
/// implements only the seams it uses.
pub trait Mechanism: Send + Sync {
    /// For logs.
    fn name(&self) -> &'static str;

    /// The CPUID offer (feature bits and leaf) that advertises it; `None` when
    /// the guest is not told (the mechanism works on the host side only).
    fn offer(&self) -> Option<Offer> {
        None
    }

    /// The device that answers exiting guest accesses to its pages.
    fn mmio(self: Arc<Self>) -> Option<Arc<dyn MmioDevice>> {
        None
    }

    /// The hypercalls it answers ([`Mechanism::hypercall`]).
    fn calls(&self) -> &'static [Call] {
        &[]
    }

    /// Answers one of [`Mechanism::calls`]; the value goes to the guest's RAX.
    fn hypercall(&self, _cx: &CallCtx<'_>, _call: Call, _arg: u64) -> u64 {
        Status::UnknownCall as u64
    }

    /// The guest starts: its vCPUs, by index.
    fn start(&self, _vcpus: &[Arc<VcpuShared>]) -> std::io::Result<()> {
        Ok(())
    }

    /// Before each `KVM_RUN` of `vcpu`; true asks for an interrupt-window exit.
    fn before_entry(&self, _fd: &mut VcpuFd, _vcpu: &VcpuShared) -> bool {
        false
    }

    /// After each exit of a vCPU, whatever its cause; true asks for an
    /// interrupt-window exit at the next entry.
    fn after_exit(&self, _cx: &mut ExitCtx<'_>) -> bool {
        false
    }

    /// A debug exit (`KVM_EXIT_DEBUG`) of `vcpu`: exception vector and
    /// address. Only a debugger that turned on `KVM_SET_GUEST_DEBUG` gets them.
    fn debug_exit(&self, _vcpu: &VcpuShared, _exception: u32, _pc: u64) {}

    /// Whether vCPU `vcpu` takes upcalls (M3).
    fn takes_upcalls(&self, _vcpu: u32) -> bool {
        false
    }

    /// A stop from outside reached `vcpu`; true keeps it running a little
    /// longer (its interrupt window is closed).
    fn defer_stop(&self, _fd: &mut VcpuFd, _vcpu: u32) -> bool {
        false
    }

    /// The guest is ending (before its vCPU threads are joined).
    fn ending(&self) {}

    /// The guest ended itself with the exit hypercall's `status`; called
    /// before [`Mechanism::ending`].
    fn exited(&self, _status: u32) {}

    /// vCPU `vcpu`'s thread leaves its run loop: no more kicks for it.
    fn vcpu_gone(&self, _vcpu: u32) {}

    /// Every vCPU thread of the guest has been joined: join the helper
    /// threads it started, so that a removed guest leaves nothing running.
    fn joined(&self) {}

    /// Adds its counters to a `StatsMark` record.
    fn mark(&self, _m: &mut MarkReport) {}

    /// Puts its part of the guest's report in.
    fn report(&self, _r: &mut GuestReport) {}
}
