//! vCPU threads: what the rest of the shim may do to a vCPU ([`handle`]) and the
//! `KVM_RUN` loop that routes exits to the platform and the mechanisms ([`exit`]).

pub mod exit;
pub mod handle;

pub use exit::{GuestCtx, Outcome};
pub use handle::VcpuShared;
