//! `cargo xtask test`: the legs, their judgements and the closing summary.

pub mod legs;
pub mod verdict;
