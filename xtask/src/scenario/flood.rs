//! The `shim-flood` leg (issue 5, "Bad input"): one guest floods its doorbell
//! ring with garbage — random words, torn and misplaced records, undefined
//! operations, unknown devices, a ring kept full — while another guest sends
//! its 10,000-event burst to the same monitor thread (both guests' vCPUs on
//! host CPU 0 with `--pin 0`, so both rings are designated to the monitor on
//! CPU 1). The flooder's garbage must be counted and rejected; the other guest
//! must lose no event and its test must pass.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::vmm::stats::GuestStats;
use crate::{infra::build, vmm::shim};

/// How long the flooder floods.
pub const FLOOD_MS: u64 = 2000;
/// When the victim starts its burst (after reaching main), so that it falls
/// inside the flood.
pub const BURST_AFTER_MS: u64 = 300;

/// What a check-based leg run gives back: its checks, report lines and log.
pub type LegRun = (Vec<(String, bool)>, Vec<String>, PathBuf);

/// Runs both guests once.
pub fn run(timeout: Duration) -> Result<LegRun> {
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
    let run = shim::run(&shim_path, &guests, &extra, timeout, "shim-flood", |_| {})?;
    let mut reports: Vec<String> = run
        .lines
        .iter()
        .filter_map(|l| l.text.split_once("report: ").map(|(_, r)| r.to_owned()))
        .collect();
    let (flood, victim) = (run.guest_stats("flood"), run.guest_stats("victim"));
    let mut checks = checks(flood, victim);
    checks.extend(
        shim::doorbell_burst_checks(victim)
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
    Ok((checks, reports, run.log))
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
