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
        "three guests move 64 MiB read → transform → write over VM queues under immediate and lazy (copy and remap) and doorbell (copy): every byte verified; under lazy and doorbell the transform's sends ≥ 8 × its own hypercall exits"
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
                        "{tag}: every immediate send made its exit ({} sends, {} hypercall exits)",
                        t.sends, t.hypercall_exits
                    ),
                    t.hypercall_exits >= t.sends,
                ));
            } else {
                // Lazy and doorbell sends make no exit of their own.
                // The shim's own counts, not the guest's word. Exits that
                // bounced off a full writer (`held`) are the receiver's lag,
                // not the send's, and vary with scheduling (reported, not
                // asserted): without them lazy sends must outnumber exits 8:1.
                let own = t.hypercall_exits.saturating_sub(t.held);
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
                        "{tag}: transform sends {} ≥ 8 × its hypercall exits that were not back-pressure ({} − {} held)",
                        t.sends, t.hypercall_exits, t.held
                    ),
                    t.sends > 0 && t.sends >= 8 * own.max(1),
                ));
            }
            reports.push(format!(
                "pipeline {tag}: {:.1} MiB/s, transform {} sends, {} hypercall exits ({} held by a full writer), {} doorbell kicks, {} KVM exits",
                r.mib_per_s, t.sends, t.hypercall_exits, t.held, t.kicks, t.exits
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
