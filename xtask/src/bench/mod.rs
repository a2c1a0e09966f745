//! `cargo xtask bench`: the benchmark suites, the runner that repeats them and
//! aggregates what they measure, and the report it writes.
//!
//! A suite names its scenarios (the things compared: "QEMU", "shim, trap",
//! "shim, doorbell") and its metrics (RTT p50 in µs, exits per packet...). The
//! runner asks it for [`suite::Suite::round`] `repeats` times; each round measures every
//! scenario once, in an order that rotates from round to round, so that drift on
//! this shared machine hits every scenario alike (interleaved A/B/A/B).
//! The runner then reports, per scenario and metric, the median with min–max over
//! rounds, and for suites with a baseline the ratio to it computed **pair by pair
//! within a round** (then median, min–max of those ratios).
//!
//! Results go to `target/bench/<suite>.json`; `report` turns every such file into
//! `docs/benchmarks.md` with its plots under `docs/bench/`.

mod boot;
mod breakdown;
mod ctrl;
mod hints;
mod notify;
mod pingpong;
mod probe;
mod report;
mod results;
pub mod runner;
mod stats;
pub mod suite;
mod svg;
mod sys;
mod upcall;
mod vmq;
