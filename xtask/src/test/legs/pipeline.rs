//! Leg `shim-pipeline`: the three-guest VM-queue pipeline under each
//! delivery policy and transfer; lazy and doorbell sends must make no exit of
//! their own.

use crate::scenario::pipeline::{self, Policy, Transfer};
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::verdict;

/// The pipeline once per (policy, transfer).
pub struct ShimPipeline;

impl Leg for ShimPipeline {
    fn name(&self) -> &'static str {
        "shim-pipeline"
    }

    fn about(&self) -> &'static str {
        "three guests move 64 MiB read → transform → write over VM queues under immediate and lazy (copy and remap) and doorbell (copy): every byte verified; under lazy and doorbell the transform's sends ≥ 8 × its own flush exits (shim-counted), lazy flushes only on a full outbox"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        run_pipelines(self.name(), opts)
    }
}

/// The pipeline once per (policy, transfer); lazy must send without exits of
/// its own: the transform's sends must outnumber its hypercall exits 8:1.
fn run_pipelines(leg: &str, opts: &Options) -> LegRun {
    let mut checks = Vec::new();
    let mut reports = Vec::new();
    let mut log = None;
    for (policy, transfer) in [
        (Policy::Immediate, Transfer::Copy),
        (Policy::Immediate, Transfer::Remap),
        (Policy::Lazy, Transfer::Copy),
        (Policy::Lazy, Transfer::Remap),
        (Policy::Doorbell, Transfer::Copy),
        (Policy::Doorbell, Transfer::Remap),
    ] {
        let o = pipeline::Options {
            policy,
            transfer,
            timeout: opts.timeout,
            ..pipeline::Options::default()
        };
        let tag = format!("{}/{}", policy.name(), transfer.name());
        let r = match pipeline::on_shim(
            &o,
            &format!("{leg}-{}-{}", policy.name(), transfer.name()),
            |_| {},
        ) {
            Ok(r) => r,
            Err(e) => {
                checks.push((format!("{tag}: {e}"), false));
                continue;
            }
        };
        checks.extend(r.checks.iter().map(|(n, ok)| (format!("{tag}: {n}"), *ok)));
        if let Some(t) = r.guests.iter().find(|g| g.name == "transform") {
            if policy == Policy::Immediate {
                checks.push((
                    format!(
                        "{tag}: every immediate send made its flush exit ({} sends, {} flush exits)",
                        t.sends, t.flush_exits
                    ),
                    t.flush_exits >= t.sends,
                ));
            } else {
                // Lazy and doorbell sends make no exit of their own. The
                // shim's own count of the transform's flush exits (hypercall
                // or kick page), nothing subtracted: the waits it makes in
                // place of halting, and drains of other guests, are not in it.
                let own = t.flush_exits;
                if policy == Policy::Lazy {
                    checks.push((
                        format!(
                            "{tag}: the transform flushed only when its outbox was full ({} flushes, {} full)",
                            t.flush_exits, t.full_flushes
                        ),
                        t.flush_exits == t.full_flushes,
                    ));
                }
                if policy == Policy::Doorbell {
                    // A doorbell event costs an exit only when the monitor
                    // had parked (a trapping kick, an ioeventfd exit); how
                    // often is M1's spin budget (--doorbell-spin-us), so
                    // only "not one per send" is asserted.
                    checks.push((
                        format!(
                            "{tag}: transform sends {} > its doorbell kicks {}",
                            t.sends, t.kicks
                        ),
                        t.sends > t.kicks,
                    ));
                }
                checks.push((
                    format!(
                        "{tag}: transform sends {} ≥ 8 × its own flush exits {}",
                        t.sends, own
                    ),
                    t.sends > 0 && t.sends >= 8 * own.max(1),
                ));
            }
            reports.push(format!(
                "pipeline {tag}: {:.1} MiB/s, transform {} sends, {} flush exits ({} full), {} waits, {} hypercall exits, {} held by a full writer, {} doorbell kicks, {} KVM exits; all guests {} steady exits/msg",
                r.mib_per_s, t.sends, t.flush_exits, t.full_flushes, t.waits, t.hypercall_exits, t.held, t.kicks, t.exits,
                r.steady_exits_per_msg().map_or_else(|| "?".to_string(), |x| format!("{x:.2}"))
            ));
        }
        log = Some(r.log);
    }
    LegRun {
        outcome: verdict::judge_checks(&checks),
        reports,
        log,
    }
}
