//! The Exitless host shim: a VMM on the rust-vmm crates that runs several guests
//! over KVM with virtio-pci devices, and offers them the paravirtual mechanisms
//! of `para_abi` (`mech`).
//!
//! The modules, from the leaves up: [`counters`], [`sync`], [`kvm`],
//! [`vcpu::handle`], [`devices`], [`pci`], [`platform`], [`hypercall`], the
//! mechanisms ([`mech`], each behind [`mech::Mechanism`]), [`report`], the run
//! loop ([`vcpu::exit`]), [`vm`], [`assemble`], [`run`] and [`cli`].

pub mod api;
pub mod assemble;
pub mod breakdown;
pub mod cli;
pub mod config;
pub mod counters;
pub mod devices;
pub mod fleet;
pub mod gdb;
pub mod hypercall;
pub mod kvm;
pub mod loglimit;
pub mod mainwake;
pub mod mech;
#[cfg(test)]
mod net_e2e_tests;
pub mod pci;
pub mod platform;
pub mod report;
pub mod run;
pub mod seccomp;
pub mod spec;
pub mod sync;
pub mod vcpu;
pub mod vm;
