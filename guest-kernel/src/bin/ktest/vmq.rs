//! VM queues (M5): where offered, hostile sends come back with their defined
//! errors (no such guest, memory not ours, a send to ourselves); where not
//! (QEMU, or the shim without `--vmq on`), the API says "unavailable".

use alloc::format;
use guest_kernel::rt::ktest_runner::require;
use guest_kernel::rt::vmq::{self, Policy, Transfer, VmqError};
use guest_kernel::{check_eq, ktest};
use para_abi::discovery::features;
use para_abi::vmq::{Message, SendStatus};

fn message(dest: u32, addr: u64, len: u32, transfer: Transfer) -> Message {
    Message {
        dest,
        policy: Policy::Immediate as u8,
        transfer: transfer as u8,
        huge: false,
        status: 0,
        len,
        flags: 0,
        addr,
        tag: 7,
    }
}

ktest!(
    fn vm_queue_sends_get_defined_errors() {
        let offered = require(features::VM_QUEUES);
        let q = match (vmq::open(), offered) {
            (Ok(q), Ok(())) => q,
            (Ok(_), Err(_)) => return Err("VM queues work although nobody offered them".into()),
            (Err(e), Ok(())) => return Err(format!("the shim offers VM queues, yet: {e}").into()),
            (Err(e), Err(skip)) => {
                check_eq!(e, VmqError::Unavailable, "no VM queues outside the shim");
                return Err(skip);
            }
        };
        let me = q
            .record(q.id())
            .ok_or("no directory record for this guest")?;
        check_eq!(me.id, q.id(), "the directory lists this guest under its id");
        let buf = alloc::vec![0x11u8; 8192];
        let addr = buf.as_ptr() as u64;
        // The shim checks the shape, then the destination, then the memory:
        // alone, this guest can only see the memory check with a peer.
        let peer = q.id() + 1;
        let outside = if q.record(peer).is_some() {
            SendStatus::OutsideRam
        } else {
            SendStatus::NoSuchVm
        };
        let cases = [
            (
                message(u32::MAX - 1, addr, 64, Transfer::Copy),
                SendStatus::NoSuchVm,
            ),
            (
                message(q.id(), addr, 64, Transfer::Copy),
                SendStatus::BadDescriptor,
            ),
            (message(peer, 0xB000_0000, 64, Transfer::Copy), outside),
            (
                message(peer, addr | 1, 64, Transfer::Remap),
                SendStatus::BadDescriptor,
            ),
        ];
        for (m, want) in cases {
            let i = q.send(&m);
            check_eq!(q.status(i), want, "the shim's answer to {m:?}");
        }
        check_eq!(q.len(), 0, "nothing arrived");
        Ok(())
    }
);
