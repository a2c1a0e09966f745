//! Apps written outside this repository: `cargo xtask new` makes one from a
//! template, `cargo xtask run --app PATH` builds it and boots it.

pub mod new;
pub mod run;
