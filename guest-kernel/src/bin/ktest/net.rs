//! The NIC: MSI-X vectors accepted and placed where asked.
//! Needs a virtio-net device; with `ktest.dhcp` on the command line (a DHCP
//! server on the link, as QEMU user networking has) it also receives.

use core::sync::atomic::Ordering;
use core::time::Duration;
use guest_kernel::percpu::CPUS;
use guest_kernel::rt::irq;
use guest_kernel::rt::net::{Net, NetConfig};
use guest_kernel::rt::start::system;
use guest_kernel::rt::time::Instant;
use guest_kernel::{check, check_eq, ktest};
use smoltcp::wire::{IpEndpoint, Ipv4Address};

fn apic(cpu: usize) -> u32 {
    CPUS[cpu].apic_id.load(Ordering::Relaxed)
}

ktest!(
    fn msix_vectors_go_to_the_cpu_asked_for() {
        check!(guest_kernel::rt::smp::online() >= 2, "needs two CPUs");
        let dhcp = system().cmdline.flag("ktest.dhcp");
        let cfg = NetConfig {
            address: (!dhcp).then(|| "10.0.0.99/24".parse().expect("literal")),
            gateway: None,
            dhcp,
            rx_mode: drivers::net::RxMode::Interrupt,
            irq_cpu: 1,
            notify: guest_kernel::rt::net::Notify::Auto,
            // This test watches TX-completion interrupts move between CPUs.
            tx_irq: true,
            wait: guest_kernel::rt::net::WaitMode::Halt,
            poll_us: 0,
            tx_at_wait: true,
        };
        let mut net = Net::open(0, &cfg).map_err(|e| alloc::format!("{e}"))?;
        check_eq!(
            net.irq_destinations().map_err(|e| alloc::format!("{e}"))?,
            (apic(1), apic(1)),
            "read back from the table"
        );
        let (rx, tx) = (net.rx_vector(), net.rx_vector() + 1);
        let before = |v| (irq::count(0, v), irq::count(1, v));
        let (rx0, tx0) = (before(rx), before(tx));

        // Send datagrams (TX completions interrupt) and, with DHCP, wait for a lease (RX).
        let h = net.udp_bind(9, 16).map_err(|e| alloc::format!("{e:?}"))?;
        let deadline = Instant::now()
            .checked_add(Duration::from_secs(10))
            .ok_or("time overflow")?;
        let mut sent = 0;
        while Instant::now() < deadline && (sent < 20 || (dhcp && net.ipv4().is_none())) {
            net.poll();
            if sent < 20 && net.ipv4().is_some() {
                let to = IpEndpoint::new(Ipv4Address::BROADCAST.into(), 9);
                if net
                    .udp(h)
                    .send_slice(b"exitless msi-x placement probe", to)
                    .is_ok()
                {
                    sent += 1;
                }
            }
            net.poll();
            net.wait(Instant::now().checked_add(Duration::from_millis(20)));
        }
        let (rx1, tx1) = (before(rx), before(tx));
        check!(sent == 20, "sent {sent} of 20 probes");
        check!(
            tx1.1 > tx0.1,
            "TX interrupts on cpu1: {} -> {}",
            tx0.1,
            tx1.1
        );
        check_eq!(tx1.0, tx0.0, "no TX interrupt on cpu0");
        check_eq!(rx1.0, rx0.0, "no RX interrupt on cpu0");
        if dhcp {
            check!(net.ipv4().is_some(), "DHCP lease obtained");
            check!(
                rx1.1 > rx0.1,
                "RX interrupts on cpu1: {} -> {}",
                rx0.1,
                rx1.1
            );
        }

        // Retarget at run time: interrupts follow to cpu0.
        net.retarget(1, 0).map_err(|e| alloc::format!("{e}"))?;
        check_eq!(
            net.irq_destinations().map_err(|e| alloc::format!("{e}"))?.1,
            apic(0)
        );
        let tx_cpu0 = irq::count(0, tx);
        for _ in 0..10 {
            let to = IpEndpoint::new(Ipv4Address::BROADCAST.into(), 9);
            let _ = net.udp(h).send_slice(b"after retarget", to);
            net.poll();
            net.wait(Instant::now().checked_add(Duration::from_millis(10)));
        }
        check!(irq::count(0, tx) > tx_cpu0, "TX interrupts moved to cpu0");
        let stats = net.stats();
        check_eq!(
            stats.rx_dropped_short + stats.rx_dropped_oversize + stats.rx_errors,
            0,
            "no receive errors"
        );
        Ok(())
    }
);
