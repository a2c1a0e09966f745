//! M4 shadowed control flags, host half (`para_abi::ctrl`): the control blocks
//! ([`blocks`]), the trapping hypercalls ([`calls`]) and the report
//! ([`report`]), attached to a guest as one [`Mechanism`].
//!
//! Virtual flags act on the shim without waiting for an exit: the NIC's worker
//! reads a shadowed quiet flag live from the shadow page before it raises an MSI
//! ([`GuestCtrl::nic0_quiet`]), and the doorbell monitors read the poll flag
//! ([`GuestCtrl::flag_set_anywhere`]).

pub mod blocks;
pub mod calls;
pub mod report;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use para_abi::ctrl::{self, Flag};
use para_abi::hypercall::Call;
use para_abi::layout::area;

pub use blocks::{CtrlError, DEFAULT_MASKS, GuestCtrl};

use crate::kvm::cpuid::Offer;
use crate::mech::{CallCtx, ExitCtx, Mechanism};
use crate::platform::MmioDevice;
use crate::report::GuestReport;
use blocks::Rejected;

/// The calls of the trapping path.
const CALLS: &[Call] = &[
    Call::CtrlWrite,
    Call::CtrlRead,
    Call::CtrlSetMasks,
    Call::CtrlQuery,
];

/// Traced exits logged at most (the count goes on).
const TRACE_LOG_LIMIT: u64 = 1000;

impl Mechanism for GuestCtrl {
    fn name(&self) -> &'static str {
        "ctrl"
    }

    fn offer(&self) -> Option<Offer> {
        Some(Self::cpuid_offer())
    }

    fn mmio(self: Arc<Self>) -> Option<Arc<dyn MmioDevice>> {
        Some(Arc::new(MaskPageMmio(self)))
    }

    fn calls(&self) -> &'static [Call] {
        CALLS
    }

    fn hypercall(&self, cx: &CallCtx<'_>, call: Call, arg: u64) -> u64 {
        self.trap_call(cx.fd, cx.vcpu.index, call, arg, cx.kvm_exits)
    }

    fn after_exit(&self, cx: &mut ExitCtx<'_>) -> bool {
        let i = cx.vcpu.index;
        self.at_exit(&*cx.fd, i);
        if self
            .vcpus
            .get(i as usize)
            .is_some_and(|v| v.values.load(Ordering::Relaxed) & Flag::Trace.bit() != 0)
        {
            let n = self.counters.traced_exits.fetch_add(1, Ordering::Relaxed);
            if n < TRACE_LOG_LIMIT {
                crate::guest_log!(info, guest = %self.name, vcpu = i, exits = cx.vcpu.exits.total(), "ctrl trace: exit");
            }
        }
        false
    }

    fn report(&self, r: &mut GuestReport) {
        r.ctrl = GuestCtrl::report(self);
    }
}

/// Exiting guest writes to the read-only mask page: refused and counted.
pub struct MaskPageMmio(pub Arc<GuestCtrl>);

impl MmioDevice for MaskPageMmio {
    fn mmio_read(&self, _addr: u64, _data: &mut [u8]) -> bool {
        false // the page is readable memory; reads never exit
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let page = area::CTRL + ctrl::MASK_PAGE;
        if !(page..page + ctrl::PAGE).contains(&addr) {
            return false;
        }
        self.0.reject(
            Rejected::MaskPageWrite,
            format_args!("write of {} bytes at {addr:#x}", data.len()),
        );
        true
    }
}
