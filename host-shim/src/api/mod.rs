//! `--api-sock`: the shim's HTTP API on a Unix socket (docs/api.yaml).
//!
//! `limits` says what one client may make the shim spend; `server` owns the socket and bounds what a client can make the shim spend;
//! `routes` checks each request and turns it into a [`model::Command`] for the
//! thread that owns the guests (the run loop, `run.rs`), which answers it;
//! `model` holds the typed bodies; `prometheus` renders the stats document
//! in Prometheus' text format.

pub mod limits;
pub mod model;
pub mod prometheus;
mod routes;
pub mod server;

pub use model::{ApiError, Command};
pub use server::ApiServer;
