//! The scenarios xtask runs: each boots its guests, lets them do their job,
//! and parses what they and the shim report. Judging the figures is left to
//! the test legs, the benchmarks and `cargo xtask run`.

pub mod flood;
pub mod hints;
pub mod interop;
pub mod pingpong;
pub mod pipeline;
pub mod redesignate;
pub mod vmqnet;
