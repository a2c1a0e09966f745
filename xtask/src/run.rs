//! `cargo xtask run` (the project's main demo) and `cargo xtask bench`:
//! placeholders until the host shim can run guests.

use crate::error::{Error, Result};

/// What `run` will do once the shim exists.
const RUN_PLAN: &[&str] = &[
    "build host-shim (release) and the demo guest images (x86_64-unknown-none)",
    "start target/release/host-shim with several guests, each with a virtio-net device wired to the others",
    "let the guests exchange packets, then print per-guest packet counts and the shim's exit counters (exits per packet)",
];

pub fn run() -> Result<()> {
    println!("cargo xtask run will:");
    for (step, what) in RUN_PLAN.iter().enumerate() {
        println!("  {}. {what}", step + 1);
    }
    Err(Error::failed(
        "the host-shim demo is not available yet (the shim cannot run guests yet); `cargo xtask test` and `cargo xtask qemu` work",
    ))
}

pub fn bench() -> Result<()> {
    Err(Error::failed(
        "cargo xtask bench is not implemented yet: benchmarks come with the host shim and the data plane",
    ))
}
