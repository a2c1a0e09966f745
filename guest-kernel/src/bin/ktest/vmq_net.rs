//! The NIC over VM queues (M5, `net.dev=vmq`): opening it needs VM queues
//! and a peer. Under QEMU (or the shim without `--vmq on`) it says "no VM
//! queues"; under the shim, a peer name nobody has, or this guest's own
//! name, is refused before any buffer is allocated. (Frames flowing are
//! the `shim-vmqnet` leg: that needs two guests.)

use guest_kernel::arch::BOOT;
use guest_kernel::rt::net::{Net, NetConfig, Notify};
use guest_kernel::rt::vmq::{self, VmqError};
use guest_kernel::rt::vmq_link::{LinkOpenError, LinkPolicy, VmqLink};
use guest_kernel::{check, check_eq, ktest};

ktest!(
    fn vm_queue_nic_needs_queues_and_a_peer() {
        let under_shim = BOOT.under_shim.load(core::sync::atomic::Ordering::Relaxed) != 0;
        let features = guest_kernel::arch::cpu::cpuid(para_abi::discovery::LEAF_FEATURES, 0).eax;
        let offered = under_shim && features & para_abi::discovery::features::VM_QUEUES != 0;
        let nobody = VmqLink::open("no-such-guest", LinkPolicy::Lazy).map(|_| ());
        if offered {
            check_eq!(nobody, Err(LinkOpenError::NoPeer), "an unknown peer name");
            let q = vmq::open().map_err(|e| alloc::format!("{e}"))?;
            let me = q
                .record(q.id())
                .ok_or("no directory record for this guest")?;
            let my_name = core::str::from_utf8(me.name_bytes()).map_err(|_| "name not UTF-8")?;
            check_eq!(
                VmqLink::open(my_name, LinkPolicy::Immediate).map(|_| ()),
                Err(LinkOpenError::NoPeer),
                "a link to this guest itself"
            );
        } else {
            check_eq!(
                nobody,
                Err(LinkOpenError::Vmq(VmqError::Unavailable)),
                "no VM-queue NIC where there are no VM queues"
            );
        }
        // Through the stack: an error, not a panic, and it says why.
        let cfg = NetConfig {
            address: Some("10.0.0.98/24".parse().expect("literal")),
            gateway: None,
            dhcp: false,
            rx_mode: drivers::net::RxMode::Interrupt,
            irq_cpu: 0,
            notify: Notify::Auto,
            tx_irq: false,
            wait: guest_kernel::rt::net::WaitMode::Auto,
            poll_us: 0,
            tx_at_wait: true,
        };
        match Net::open_vmq("no-such-guest", LinkPolicy::Lazy, &cfg) {
            Ok(_) => return Err("a VM-queue NIC to nobody opened".into()),
            Err(e) => {
                let msg = alloc::format!("{e}");
                check!(
                    msg.starts_with("net.dev=vmq: "),
                    "error names the NIC type: {msg}"
                );
            }
        }
        Ok(())
    }
);
