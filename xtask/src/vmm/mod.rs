//! The two ways xtask runs guests: QEMU, and the project's own host shim with
//! typed mirrors of the statistics it writes.

pub mod exit;
pub mod qemu;
pub mod shim;
pub mod stats;
