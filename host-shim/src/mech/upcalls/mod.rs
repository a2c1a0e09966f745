//! M3 upcalls, host half (`para_abi::upcall`): the delivery of the shim's
//! events when the vCPU's interrupt window is open ([`delivery`]), the storm
//! and poll machinery for tests and comparisons ([`bench`](mod@bench)) and the report
//! ([`report`]), attached to a guest as one [`Mechanism`], [`Upcalls`].

pub mod bench;
pub mod delivery;
pub mod report;

use std::sync::Arc;

use kvm_ioctls::VcpuFd;
use para_abi::hypercall::{Call, Status};
use para_abi::upcall::{self, Class as UpcallClass, PING_MAX, STORM_MAX};

pub use delivery::{GuestUpcalls, UpcallError};
pub use report::Delivery;

use crate::kvm::cpuid::Offer;
use crate::mech::{CallCtx, Mechanism, Upcaller};
use crate::report::GuestReport;
use crate::vcpu::handle::VcpuShared;
use delivery::Rejected;

/// M3 as a guest's mechanism.
pub struct Upcalls(pub Arc<GuestUpcalls>);

impl Upcalls {
    /// How other mechanisms post guest-wide upcalls through this one.
    #[must_use]
    pub fn upcaller(&self) -> Upcaller {
        let up = self.0.clone();
        Arc::new(move |preferred, class| up.post_to_guest(preferred, class))
    }

    /// A hypercall of this module from vCPU `vcpu`.
    pub fn call(&self, call: Call, arg: u64, vcpu: &Arc<VcpuShared>) -> Status {
        let up = &self.0;
        let i = vcpu.index;
        if i as usize >= up.vcpu_count() {
            up.reject(Rejected::NoMailbox, format_args!("vCPU {i}"));
            return Status::BadArgument;
        }
        if matches!(call, Call::UpcallPing | Call::UpcallStorm)
            && !up.test_calls.load(std::sync::atomic::Ordering::Relaxed)
        {
            up.reject(
                Rejected::TestCallOff,
                format_args!("{call:?} (start the shim with --test-hypercalls)"),
            );
            return Status::UnknownCall;
        }
        match call {
            Call::UpcallPing => {
                if arg == 0 || arg > PING_MAX {
                    up.reject(Rejected::BadCount, format_args!("ping count {arg}"));
                    return Status::BadArgument;
                }
                up.post(i, UpcallClass::Ping, arg, || vcpu.kick());
                Status::Ok
            }
            Call::UpcallStorm => {
                let (count, interval_us) = upcall::storm_from_arg(arg);
                if count == 0 || u64::from(count) > STORM_MAX {
                    up.reject(Rejected::BadCount, format_args!("storm count {count}"));
                    return Status::BadArgument;
                }
                if interval_us > bench::STORM_INTERVAL_MAX_US {
                    up.reject(
                        Rejected::BadInterval,
                        format_args!("storm interval {interval_us} µs"),
                    );
                    return Status::BadArgument;
                }
                match bench::start_storm(up, i, count, interval_us, vcpu.clone()) {
                    Ok(true) => Status::Ok,
                    Ok(false) => {
                        up.reject(
                            Rejected::StormBusy,
                            format_args!("storm of {count} while one runs"),
                        );
                        Status::BadArgument
                    }
                    Err(e) => {
                        crate::guest_log!(warn, guest = %up.name, "upcall storm thread: {e}");
                        Status::BadArgument
                    }
                }
            }
            Call::UpcallEnable => {
                up.enable(i);
                Status::Ok
            }
            _ => Status::UnknownCall,
        }
    }
}

/// The calls of the module.
const CALLS: &[Call] = &[Call::UpcallPing, Call::UpcallStorm, Call::UpcallEnable];

impl Mechanism for Upcalls {
    fn name(&self) -> &'static str {
        "upcalls"
    }

    fn offer(&self) -> Option<Offer> {
        Some(GuestUpcalls::cpuid_offer())
    }

    fn calls(&self) -> &'static [Call] {
        CALLS
    }

    fn hypercall(&self, cx: &CallCtx<'_>, call: Call, arg: u64) -> u64 {
        self.call(call, arg, cx.vcpu) as u64
    }

    fn start(&self, vcpus: &[Arc<VcpuShared>]) -> std::io::Result<()> {
        self.0.set_vcpus(vcpus.to_vec());
        bench::start_poller(&self.0, vcpus.to_vec())
    }

    fn before_entry(&self, fd: &mut VcpuFd, vcpu: &VcpuShared) -> bool {
        self.0.service(fd, vcpu.index)
    }

    fn takes_upcalls(&self, vcpu: u32) -> bool {
        self.0.takes(vcpu)
    }

    fn defer_stop(&self, fd: &mut VcpuFd, vcpu: u32) -> bool {
        self.0.defer_stop(fd, vcpu)
    }

    fn ending(&self) {
        self.0.close();
    }

    fn vcpu_gone(&self, vcpu: u32) {
        self.0.vcpu_gone(vcpu);
    }

    fn joined(&self) {
        self.0.join_watchdog();
    }

    fn report(&self, r: &mut GuestReport) {
        r.upcalls = Some(self.0.report());
    }
}
