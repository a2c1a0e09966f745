//! The Exitless paravirtual ABI: everything the guest and the host shim agree on.
//!
//! This crate is `no_std`, has no dependencies of ours, and holds only constants,
//! record layouts and the pure logic of shared-memory protocols, so that both
//! sides compile the very same definitions.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod ctrl;
pub mod direct;
pub mod discovery;
pub mod doorbell;
pub mod hints;
pub mod hypercall;
pub mod layout;
pub mod region;
pub mod report;
pub mod upcall;
pub mod vmq;
