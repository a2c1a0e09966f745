//! Every leg of `cargo xtask test`, each in its file with its judgement.

pub mod api;
pub mod backtrace;
pub mod containerd;
pub mod direct;
pub mod doorbell;
pub mod flood;
pub mod fuzz;
pub mod gdb;
pub mod guest;
pub mod guest_shim;
pub mod hints;
pub mod hostile;
pub mod interop;
pub mod parallel_tcp;
pub mod pingpong;
pub mod pipeline;
pub mod redesignate;
pub mod soak;
pub mod tap;
pub mod template;
pub mod unit;
pub mod vmqnet;
