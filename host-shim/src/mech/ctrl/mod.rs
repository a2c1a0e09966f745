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
pub mod wait;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvm_ioctls::VcpuFd;
use para_abi::ctrl::{self, Flag};
use para_abi::hypercall::Call;
use para_abi::layout::area;

pub use blocks::{CtrlError, DEFAULT_MASKS, GuestCtrl};

use crate::kvm::cpuid::Offer;
use crate::mech::{CallCtx, ExitCtx, Mechanism};
use crate::platform::MmioDevice;
use crate::report::GuestReport;
use crate::vcpu::handle::VcpuShared;
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

    fn before_entry(&self, fd: &mut VcpuFd, _vcpu: &VcpuShared) -> bool {
        self.measure_tsc_offset(fd);
        false
    }

    fn start(&self, vcpus: &[Arc<VcpuShared>]) -> std::io::Result<()> {
        self.waits.set_vcpus(vcpus);
        Ok(())
    }

    fn after_exit(&self, cx: &mut ExitCtx<'_>) -> bool {
        let i = cx.vcpu.index;
        self.at_exit(&*cx.fd, i);
        // The exit was a wait request: the shadow (the quiet flag) is taken
        // above, so the NIC already withholds the MSI this wait replaces.
        if let Some(r) = wait::take() {
            if r.tx {
                self.nic0_tx_at_wait();
            }
            let run = std::ptr::from_mut(cx.fd.get_kvm_run());
            // SAFETY: `run` is this thread's mapped kvm_run, alive for the fd's
            // life; the kick handler stores immediate_exit from a signal on this
            // same thread, hence the volatile read.
            let kicked =
                || unsafe { std::ptr::read_volatile(&raw const (*run).immediate_exit) != 0 };
            self.waits.block(
                cx.vcpu,
                r,
                self.wait_word(ctrl::wait::RX_SEQ),
                kicked,
                cx.stopping,
            );
        }
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

/// Exiting guest writes to the read-only mask page: refused and counted; to
/// the wait page: a wait request (validated).
pub struct MaskPageMmio(pub Arc<GuestCtrl>);

impl MmioDevice for MaskPageMmio {
    fn mmio_read(&self, _addr: u64, _data: &mut [u8]) -> bool {
        false // the page is readable memory; reads never exit
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let wait = area::CTRL + ctrl::WAIT_PAGE;
        if (wait..wait + ctrl::PAGE).contains(&addr) {
            self.0.wait_store(addr - wait, data);
            return true;
        }
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
