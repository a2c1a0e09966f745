//! What the shim asks of KVM for every guest, whatever it is offered: guest
//! memory and memslots, the CPUID it sees, the PVH boot, the ACPI tables, and
//! KVM's own per-vCPU statistics.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod memory;
pub mod stats;
