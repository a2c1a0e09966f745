//! `cargo xtask run --demo pipeline`: the three-guest VM-queue pipeline, its
//! summary and its `--json` document.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::Result;
use crate::infra::workspace;
use crate::scenario::pipeline::{Options, Outcome, on_shim};
use crate::test::verdict;

/// The `--json` document.
#[must_use]
pub fn json(o: &Options, r: &Outcome) -> Value {
    json!({
        "schema_version": super::JSON_SCHEMA_VERSION,
        "demo": "pipeline",
        "policy": o.policy.name(),
        "transfer": o.transfer.name(),
        "message_bytes": o.msg,
        "bytes_sent": r.bytes_sent,
        "bytes_verified": r.bytes_verified,
        "mib_per_s": r.mib_per_s,
        "guests": r.guests.iter().map(|g| json!({
            "name": g.name, "exits": g.exits, "sends": g.sends, "flushes": g.flushes,
            "hypercall_exits": g.hypercall_exits, "held": g.held, "doorbell_kicks": g.kicks,
            "flush_exits": g.flush_exits, "full_flushes": g.full_flushes, "waits": g.waits,
            "steady_exits": g.steady_exits, "steady_msgs": g.steady_msgs, "pf_taken": g.pf_taken,
            "host_irq_exits": g.host_irqs,
        })).collect::<Vec<_>>(),
        "steady_exits_per_msg": r.steady_exits_per_msg(),
    })
}

/// `cargo xtask run --demo pipeline`.
pub fn run(o: &Options, json_path: Option<&Path>, verbose: bool) -> Result<()> {
    println!(
        "cargo xtask run --demo pipeline: {} MiB read → transform → write, policy {}, transfer {}, {} B messages",
        o.mib,
        o.policy.name(),
        o.transfer.name(),
        o.msg
    );
    let r = on_shim(o, "run-pipeline", |line| {
        if verbose
            || line.contains("pipeline")
            || line.contains("report:")
            || crate::vmm::shim::is_alarm(line)
        {
            println!("{line}");
        }
    })?;
    println!(
        "pipeline: {} of {} bytes verified, {:.1} MiB/s",
        r.bytes_verified, r.bytes_sent, r.mib_per_s
    );
    for g in &r.guests {
        println!(
            "  {:<9} exits {:>7} (steady {:>6} over {} msgs)  pf_taken {:>6}  host irqs {:>5}  sends {:>6}  flush exits {:>5} ({} full)  waits {:>6}",
            g.name,
            g.exits,
            g.steady_exits
                .map_or_else(|| "?".to_string(), |x| x.to_string()),
            g.steady_msgs,
            g.pf_taken,
            g.host_irqs,
            g.sends,
            g.flush_exits,
            g.full_flushes,
            g.waits
        );
    }
    if let Some(x) = r.steady_exits_per_msg() {
        println!("  steady KVM exits per message, all guests: {x:.2}");
    }
    if let Some(path) = json_path {
        workspace::write_json(path, &json(o, &r))?;
        println!("results written to {}", path.display());
    }
    println!("full log: {}", r.log.display());
    verdict::require_all("the pipeline did not complete", &r.checks)
}
