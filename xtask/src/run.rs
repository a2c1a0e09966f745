//! `cargo xtask run`: the project's main job — the host shim running a UDP
//! ping-pong between guests, with a summary of packets, round-trip times and
//! VM exits per packet.

use std::path::Path;

use crate::demo;
use crate::error::{Error, Result};
use crate::setup;

pub fn run(opts: &demo::Options, json: Option<&Path>, verbose: bool) -> Result<()> {
    setup::ensure_guest_target()?;
    println!(
        "cargo xtask run: building host-shim and the udp-pingpong guest, then starting {} guests under the shim",
        opts.guests
    );
    let report = demo::on_shim(opts, "run-pingpong", |line| {
        let shown = verbose
            || ["report:", "udp-pingpong:", "net0:", "boot: main reached"]
                .iter()
                .any(|k| line.contains(k));
        if shown {
            println!("{line}");
        }
    })?;
    for line in demo::summary(opts, &report) {
        println!("{line}");
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&demo::json(opts, &report))
            .map_err(|e| Error::failed(e.to_string()))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", path.display())))?;
        println!("results written to {}", path.display());
    }
    println!("full log: {}", report.log.display());
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| n.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::failed(format!(
            "the demo did not complete: {}",
            failed.join("; ")
        )))
    }
}
