//! PCI discovery from ring 3.

use guest_kernel::rt::pci::{Access, Bdf, enumerate};
use guest_kernel::rt::start::system;
use guest_kernel::{check, check_eq, ktest, println};

ktest!(
    fn bus_zero_has_a_host_bridge() {
        let functions = enumerate(system().pci);
        check!(!functions.is_empty(), "no PCI functions found");
        let host = functions
            .iter()
            .find(|f| f.bdf == Bdf::new(0, 0, 0))
            .ok_or("nothing at 00:00.0")?;
        check_eq!(
            (host.class, host.subclass),
            (0x06, 0x00),
            "00:00.0 is a host bridge"
        );
        for f in &functions {
            println!(
                "report: pci {} {:04x}:{:04x} class {:02x}.{:02x}",
                f.bdf, f.vendor, f.device, f.class, f.subclass
            );
        }
        Ok(())
    }
);

ktest!(
    fn ecam_and_port_access_agree() {
        // Without an MCFG there is only one access method: nothing to compare.
        guest_kernel::rt::ktest_runner::require_ecam()?;
        for off in [0u16, 8, 0xC, 0x2C] {
            let via_ecam = system().pci.read(Bdf::new(0, 0, 0), off);
            let via_ports = Access::Ports.read(Bdf::new(0, 0, 0), off);
            check_eq!(via_ecam, via_ports);
        }
        check_eq!(
            system().pci.read(Bdf::new(0, 31, 7), 0) & 0xFFFF,
            Access::Ports.read(Bdf::new(0, 31, 7), 0) & 0xFFFF
        );
        Ok(())
    }
);
