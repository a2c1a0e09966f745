//! The flood scenario (leg `shim-flood`): one guest floods its doorbell
//! ring with garbage — random words, torn and misplaced records, undefined
//! operations, unknown devices, a ring kept full — while another guest sends
//! its 10,000-event burst to the same monitor thread (both guests' vCPUs on
//! host CPU 0 with `--pin 0`, so both rings are designated to the monitor on
//! CPU 1). The leg judges what the shim counted.

use std::time::Duration;

use crate::error::Result;
use crate::{infra::build, vmm::shim};

/// How long the flooder floods.
pub const FLOOD_MS: u64 = 2000;
/// When the victim starts its burst (after reaching main), so that it falls
/// inside the flood.
pub const BURST_AFTER_MS: u64 = 300;

/// Runs both guests once; the shim's stats name them `flood` and `victim`.
pub fn run(timeout: Duration) -> Result<shim::Run> {
    let image = build::build_guest(build::find_image("ktest")?)?;
    let shim_path = shim::build()?;
    let guests = [
        shim::Guest {
            name: "flood".into(),
            image: image.clone(),
            vcpus: 1,
            mem_mib: 128,
            cmdline: format!("ktest.filter=doorbell_flood doorbell.flood_ms={FLOOD_MS}"),
        },
        shim::Guest {
            name: "victim".into(),
            image,
            vcpus: 1,
            mem_mib: 128,
            cmdline: format!("ktest.filter=ten_thousand doorbell.burst_after_ms={BURST_AFTER_MS}"),
        },
    ];
    let extra: Vec<String> = ["--no-net", "--pin", "0", "--quiet"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    shim::run(&shim_path, &guests, &extra, timeout, "shim-flood", |_| {})
}

/// The guests' `report:` lines.
#[must_use]
pub fn reports(run: &shim::Run) -> Vec<String> {
    run.lines
        .iter()
        .filter_map(|l| l.text.split_once("report: ").map(|(_, r)| r.to_owned()))
        .collect()
}
