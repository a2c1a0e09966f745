//! `cargo xtask run`: the demos, with their summaries and `--json` documents.

pub mod pingpong;
pub mod pipeline;
