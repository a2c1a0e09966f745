//! M4's trapping path: the control-flag hypercalls (`CtrlWrite`, `CtrlRead`,
//! `CtrlSetMasks`, `CtrlQuery`; `para_abi::ctrl`), answered on the calling
//! vCPU's thread after its earlier shadow writes were taken.

use std::sync::atomic::Ordering;

use kvm_ioctls::VcpuFd;
use para_abi::ctrl::{self, Flag, Masks, WriteError};
use para_abi::hypercall::{Call, Status};

use super::blocks::{Cr0, GuestCtrl, Rejected};

impl GuestCtrl {
    /// Answers an M4 hypercall from `vcpu`; the value goes to RAX.
    pub fn trap_call(
        &self,
        fd: &VcpuFd,
        vcpu: u32,
        call: Call,
        arg: u64,
        kvm_exits: &dyn Fn() -> u64,
    ) -> u64 {
        // Earlier shadow writes come first, in program order.
        let hw = self.consume_shadow(vcpu);
        self.apply_cr0(fd, vcpu, hw);
        self.hypercall_on(fd, kvm_exits, vcpu, call, arg)
    }

    /// Fuzzing entry (feature `fuzzing`): one M4 hypercall of `vcpu`, as
    /// [`Self::trap_call`] runs it, against a CR0 that needs no KVM.
    #[cfg(feature = "fuzzing")]
    pub fn fuzz_call(&self, cpu: &dyn Cr0, vcpu: u32, call: Call, arg: u64) -> u64 {
        let hw = self.consume_shadow(vcpu);
        self.apply_cr0(cpu, vcpu, hw);
        self.hypercall_on(cpu, &|| 0, vcpu, call, arg)
    }

    /// [`Self::trap_call`] after the shadow was consumed; `cpu` is the vCPU's CR0.
    fn hypercall_on(
        &self,
        cpu: &dyn Cr0,
        kvm_exits: &dyn Fn() -> u64,
        vcpu: u32,
        call: Call,
        arg: u64,
    ) -> u64 {
        let Some(v) = self.vcpus.get(vcpu as usize) else {
            return Status::BadArgument as u64;
        };
        match call {
            Call::CtrlWrite => match ctrl::decode_write(arg) {
                Ok((flag, value)) => {
                    self.trap_write(cpu, vcpu, flag, value);
                    Status::Ok as u64
                }
                Err(e) => {
                    let r = match e {
                        WriteError::UnknownFlag => Rejected::UnknownFlag,
                        WriteError::BadValue => Rejected::BadValue,
                    };
                    self.reject(r, format_args!("CtrlWrite {arg:#x} from vCPU {vcpu}"));
                    Status::BadArgument as u64
                }
            },
            Call::CtrlRead => {
                let Some(f) = Flag::from_id(arg) else {
                    self.reject(
                        Rejected::UnknownFlag,
                        format_args!("CtrlRead {arg:#x} from vCPU {vcpu}"),
                    );
                    return Status::BadArgument as u64;
                };
                self.counters
                    .hypercall_reads
                    .fetch_add(1, Ordering::Relaxed);
                let vals = if f.is_hardware() {
                    Self::cr0_flags(cpu).unwrap_or(0)
                } else {
                    v.values.load(Ordering::Relaxed)
                };
                u64::from(vals & f.bit() != 0)
            }
            Call::CtrlSetMasks => match Masks::decode(arg) {
                Ok(m) => {
                    let _ = self.request_masks(vcpu, m);
                    // Published by the exit hook after this call, like any change.
                    Status::Ok as u64
                }
                Err(e) => {
                    self.reject(
                        Rejected::BadMasks,
                        format_args!("CtrlSetMasks {arg:#x} from vCPU {vcpu}: {e:?}"),
                    );
                    Status::BadArgument as u64
                }
            },
            Call::CtrlQuery => match arg {
                ctrl::query::KVM_EXITS => kvm_exits(),
                ctrl::query::HOST_VALUES => v.values.load(Ordering::Relaxed),
                ctrl::query::HYPERCALL_WRITES => v.hypercall_writes.load(Ordering::Relaxed),
                ctrl::query::SHADOW_CHANGES => v.shadow_changes.load(Ordering::Relaxed),
                ctrl::query::REJECTS => self.counters.rejected.total(),
                ctrl::query::SUPPRESSED_MSIS => {
                    self.counters.msis_suppressed.load(Ordering::Relaxed)
                }
                ctrl::query::TRACED_EXITS => self.counters.traced_exits.load(Ordering::Relaxed),
                _ => Status::BadArgument as u64,
            },
            _ => Status::UnknownCall as u64,
        }
    }
}
