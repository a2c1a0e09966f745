//! `cargo xtask run`: the project's main job — the host shim running a UDP
//! ping-pong between guests, with a summary of packets, round-trip times and
//! VM exits per packet.

use std::path::Path;

use crate::demo;
use crate::error::Result;
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
        crate::workspace::write_json(path, &demo::json(opts, &report))?;
        println!("results written to {}", path.display());
    }
    println!("full log: {}", report.log.display());
    crate::verdict::require_all("the demo did not complete", &report.checks)
}
