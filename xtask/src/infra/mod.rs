//! What every task stands on: running processes and keeping their logs,
//! setting up the machine (and its TAP devices and namespaces), building the workspace, and reading the output of
//! `cargo test` and of a guest's serial console.

pub mod build;
pub mod cargo_test;
pub mod iproute;
pub mod logfile;
pub mod process;
pub mod serial;
pub mod setup;
pub mod symbols;
pub mod sys;
pub mod unix_http;
pub mod workspace;
