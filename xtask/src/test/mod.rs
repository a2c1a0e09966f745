//! `cargo xtask test`: the legs, their judgements and the closing summary.

pub mod leg;
pub mod legs;
pub mod registry;
pub mod runner;
pub mod verdict;
