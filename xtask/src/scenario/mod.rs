//! The scenarios xtask runs: each boots its guests, lets them do their job,
//! and parses what they and the shim report. The two demos also say whether
//! they completed (every guest exited 0, every ping or byte through), which
//! `cargo xtask run`, the benchmarks and the legs all need; what the figures
//! must be is judged beside each test leg (`test/legs/`).

pub mod flood;
pub mod hints;
pub mod pingpong;
pub mod pipeline;
pub mod redesignate;
pub mod vmqnet;
