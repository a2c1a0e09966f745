//! The Exitless host shim: a VMM on the rust-vmm crates that runs several guests
//! over KVM with virtio-pci devices (DESIGN §1, issue 3).

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod cpuid;
pub mod ctrl;
pub mod devices;
pub mod doorbell;
pub mod hints;
pub mod hypercall;
pub mod loglimit;
pub mod memory;
#[cfg(test)]
mod net_e2e_tests;
pub mod pci;
pub mod pending;
pub mod platform;
pub mod quantum;
pub mod run;
pub mod serial;
pub mod stats;
pub mod switch;
pub mod tap;
pub mod vcpu;
pub mod vm;
pub mod vmq;
