//! `cargo xtask run`: the demos, with their summaries and `--json` documents.

pub mod pingpong;
pub mod pipeline;

/// The version of the `--json` documents: raised whenever a key changes
/// meaning or goes away; new keys may come without it (docs/json.md).
pub const JSON_SCHEMA_VERSION: u32 = 1;
