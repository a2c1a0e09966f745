//! The ring-3 runtime: unprivileged bring-up (heap, ACPI, PCI,
//! SMP), interrupt handlers run as upcalls, logging, time, and the pieces
//! applications use. Nothing here executes a privileged instruction; what needs
//! privilege goes through [`sys`].

pub mod console;
pub mod ctrl;
pub mod direct_link;
pub mod doorbell;
pub mod fault;
pub mod hints;
pub mod irq;
pub mod ktest_runner;
pub mod net;
pub mod panic;
pub mod pci;
pub mod platform;
pub mod smp;
pub mod start;
pub mod sys;
pub mod task;
pub mod time;
pub mod upcall;
pub mod virtio;
pub mod vmq;
pub mod vmq_link;
pub mod wait;
