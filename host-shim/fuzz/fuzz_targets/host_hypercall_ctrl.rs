//! Hypercall arguments and M4's control blocks: `hypercall::decode` on any
//! register values, then every M4 call (`CtrlWrite`, `CtrlRead`,
//! `CtrlSetMasks`, `CtrlQuery`, and any other number) with any argument and
//! vCPU, interleaved with guest stores anywhere in the shadow page and the
//! per-exit work, against a fake CR0 (no KVM); plus the guest's seqlocked
//! reading of a mask record (`ctrl::read_masks`) over fuzzer words.
//!
//! Input: 18-byte operations: kind, vCPU, then two u64 values.
#![no_main]

use std::cell::Cell;

use host_shim::hypercall::{self, Action};
use host_shim::mech::ctrl::GuestCtrl;
use host_shim::mech::ctrl::blocks::Cr0;
use libfuzzer_sys::fuzz_target;
use para_abi::ctrl;
use para_abi::hypercall::Call;

/// A vCPU's CR0 without KVM; a write may fail, as `KVM_SET_SREGS` may.
struct FakeCr0(Cell<u64>, bool);

impl Cr0 for FakeCr0 {
    fn cr0(&self) -> Option<u64> {
        Some(self.0.get())
    }
    fn set_cr0(&self, cr0: u64) -> bool {
        if self.1 {
            self.0.set(cr0);
        }
        self.1
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(ctl) = GuestCtrl::new("fuzz", 2) else {
        return;
    };
    let cpu = FakeCr0(
        Cell::new(0x8000_0033),
        data.first().is_some_and(|b| b & 1 == 0),
    );
    for op in data.chunks_exact(18).take(128) {
        let vcpu = u32::from(op[1] % 4); // vCPUs 2 and 3 do not exist
        let a = u64::from_le_bytes(op[2..10].try_into().unwrap());
        let b = u64::from_le_bytes(op[10..18].try_into().unwrap());
        match op[0] % 5 {
            0 => {
                // The run loop's decoding; mechanism calls go to M4 here.
                if let Action::Mechanism { call, arg } = hypercall::decode(4, a, b) {
                    let _ = ctl.fuzz_call(&cpu, vcpu, call, arg);
                }
            }
            1 => {
                let call = [
                    Call::CtrlWrite,
                    Call::CtrlRead,
                    Call::CtrlSetMasks,
                    Call::CtrlQuery,
                ][(a % 4) as usize];
                let _ = ctl.fuzz_call(&cpu, vcpu, call, b);
            }
            2 => ctl.fuzz_guest_store(a % ctrl::PAGE, b),
            3 => ctl.fuzz_exit(&cpu, vcpu),
            _ => {
                let _ = hypercall::decode((a % 9) as usize, b, a);
                // The guest's reading of a mask record the host publishes: any
                // words, any number of tries.
                let words = [a, b, a ^ b, a.rotate_left(7)];
                let mut i = 0;
                let _ = ctrl::read_masks(
                    |_| {
                        i += 1;
                        words[i % 4]
                    },
                    (b % 8) as u32,
                );
            }
        }
    }
    let _ = ctl.report();
});
