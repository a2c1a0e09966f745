//! Leg `shim-flood`: one guest floods its doorbell ring with garbage while
//! another sends its 10,000-event burst to the same monitor. The garbage must
//! be counted and rejected; the other guest must lose no event.

use crate::scenario::flood;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::legs::guest_shim::doorbell_burst_checks;
use crate::vmm::stats::GuestStats;

/// A flooder and a victim on one monitor.
pub struct ShimFlood;

impl Leg for ShimFlood {
    fn name(&self) -> &'static str {
        "shim-flood"
    }

    fn about(&self) -> &'static str {
        "one guest floods its doorbell ring with garbage while another sends its 10,000-event burst to the same monitor: garbage counted and rejected, no event of the other lost"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        let run = match flood::run(opts.timeout) {
            Ok(run) => run,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let mut reports = flood::reports(&run);
        let (flood, victim) = (run.guest_stats("flood"), run.guest_stats("victim"));
        let mut checks = checks(flood, victim);
        checks.extend(
            doorbell_burst_checks(victim)
                .into_iter()
                .map(|(n, ok)| (format!("victim: {n}"), ok)),
        );
        if let Some(f) = flood {
            reports.push(format!(
                "flooder: rejected {}, overflow entries drained {}",
                json_text(&f.doorbell.rejected),
                f.doorbell.overflow_drained
            ));
        }
        LegRun::from_checks(&checks, reports, Some(run.log))
    }
}

/// `value` as compact JSON, the way the shim's stats show it.
fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Records of `g` the shim refused for `reason` (it lists non-zero reasons only).
fn rejected(g: &GuestStats, reason: &str) -> u64 {
    g.doorbell.rejected.get(reason).copied().unwrap_or(0)
}

/// The checks on the two guests' stats entries.
fn checks(flood: Option<&GuestStats>, victim: Option<&GuestStats>) -> Vec<(String, bool)> {
    let (Some(f), Some(v)) = (flood, victim) else {
        return vec![("the shim reported both guests".to_owned(), false)];
    };
    let mut c = Vec::new();
    for (name, g) in [("flood", f), ("victim", v)] {
        c.push((
            format!("{name}: its test passed (exit status 0)"),
            g.exit_status == Some(0),
        ));
    }
    for reason in [
        "bad_check",
        "wrong_sequence",
        "unknown_op",
        "unknown_device",
    ] {
        let n = rejected(f, reason);
        c.push((format!("flood: garbage rejected as {reason} ({n})"), n > 0));
    }
    let vr = &v.doorbell.rejected;
    c.push((
        format!("victim: nothing of its own rejected ({})", json_text(vr)),
        vr.is_empty(),
    ));
    // Both ran at once: the victim's burst (marks 1, 2) lies between the
    // flooder's marks around its flood (shim wall clock).
    #[allow(clippy::cast_precision_loss)] // ms since 1970: far below 2^52
    let at = |g: &GuestStats, label: u64| Some(g.mark(label)?.unix_ms as f64);
    let inside = match (at(f, 0x200), at(v, 1), at(v, 2), at(f, 0x201)) {
        (Some(f0), Some(v0), Some(v1), Some(f1)) => {
            c.push((
                format!(
                    "the burst fell inside the flood (burst {:.0}..{:.0} ms after the flood began, flood {:.0} ms)",
                    v0 - f0,
                    v1 - f0,
                    f1 - f0
                ),
                f0 < v0 && v1 < f1,
            ));
            true
        }
        _ => false,
    };
    if !inside {
        c.push(("marks around the flood and the burst".to_owned(), false));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::stats::{self, mark};

    fn guest(marks: Vec<stats::Mark>, rejected: &[(&str, u64)]) -> GuestStats {
        let mut g = stats::sample("ktest");
        g.exit_status = Some(0);
        g.marks = marks;
        g.doorbell.rejected = rejected.iter().map(|&(k, n)| (k.to_owned(), n)).collect();
        g
    }

    #[test]
    fn a_victim_with_rejections_or_a_clean_flooder_fails() {
        let flood = guest(
            vec![mark(0x200, 0, 0, 100), mark(0x201, 0, 0, 2100)],
            &[
                ("bad_check", 5),
                ("wrong_sequence", 2),
                ("unknown_op", 1),
                ("unknown_device", 9),
            ],
        );
        let victim = guest(vec![mark(1, 0, 0, 400), mark(2, 0, 0, 430)], &[]);
        let all_ok = |c: &[(String, bool)]| c.iter().all(|(_, ok)| *ok);
        assert!(all_ok(&checks(Some(&flood), Some(&victim))));
        let mut v2 = victim.clone();
        v2.doorbell.rejected.insert("bad_check".into(), 1);
        assert!(!all_ok(&checks(Some(&flood), Some(&v2))));
        let f2 = guest(flood.marks.clone(), &[("bad_check", 5)]);
        assert!(!all_ok(&checks(Some(&f2), Some(&victim))));
        let mut late = victim.clone();
        late.marks[1].unix_ms = 2500;
        assert!(!all_ok(&checks(Some(&flood), Some(&late))));
        assert!(!all_ok(&checks(None, Some(&victim))));
    }
}
