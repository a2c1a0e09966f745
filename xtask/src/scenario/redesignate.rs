//! The `shim-redesignate` leg (issue 5 items 2 and 4): ktest's
//! `doorbell_redesignation_keeps_every_event` under the shim with
//! `--doorbell-redesignate`: the guest sends sink events, asks the shim
//! (hypercall 21) to move its range to the spare range of another host CPU's
//! monitor, is told by the designation notification (an M3 Redesignation
//! upcall, or vector 0x34 without upcalls), moves, and sends more. Every event sent between stats marks 0x300 and 0x301 must be
//! consumed exactly once.

use std::time::Duration;

use crate::error::Result;
use crate::vmm::stats::{GuestStats, UpcallStats};
use crate::{infra::build, vmm::shim};

/// Runs the guest twice: with M3 upcalls (the shim's default; the
/// re-designation is announced by a Redesignation upcall) and with
/// `--upcalls off` (the MSI fallback on vector 0x34).
pub fn run(timeout: Duration) -> Result<crate::scenario::flood::LegRun> {
    let (mut checks, mut reports, log) = run_once(timeout, true)?;
    let (off_checks, off_reports, _) = run_once(timeout, false)?;
    checks.extend(
        off_checks
            .into_iter()
            .map(|(what, ok)| (format!("--upcalls off: {what}"), ok)),
    );
    reports.extend(
        off_reports
            .into_iter()
            .map(|r| format!("--upcalls off: {r}")),
    );
    Ok((checks, reports, log))
}

/// Runs the guest once, with or without upcalls.
fn run_once(timeout: Duration, upcalls: bool) -> Result<crate::scenario::flood::LegRun> {
    let image = build::build_guest(build::find_image("ktest")?)?;
    let shim_path = shim::build()?;
    let guest = shim::Guest {
        name: "ktest".into(),
        image,
        vcpus: 2,
        mem_mib: 128,
        cmdline: "ktest.filter=redesignation".into(),
    };
    let mut extra: Vec<String> = ["--no-net", "--doorbell-redesignate", "--quiet"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if !upcalls {
        extra.extend(["--upcalls".to_owned(), "off".to_owned()]);
    }
    let run = shim::run(
        &shim_path,
        &[guest],
        &extra,
        timeout,
        if upcalls {
            "shim-redesignate"
        } else {
            "shim-redesignate-msi"
        },
        |_| {},
    )?;
    let reports: Vec<String> = run
        .lines
        .iter()
        .filter_map(|l| l.text.split_once("report: ").map(|(_, r)| r.to_owned()))
        .collect();
    let sent = reports.iter().find_map(|r| events_sent(r));
    let mut checks = checks(run.guest_stats("ktest"), sent);
    // Which notification the guest saw: the upcall, or the MSI without upcalls.
    let seen = reports.iter().find_map(|r| notifications(r));
    checks.push((
        format!(
            "the guest was notified by {} ((MSIs, upcalls) on cpu 0: {seen:?})",
            if upcalls {
                "the upcall, not the MSI"
            } else {
                "the MSI"
            }
        ),
        seen == Some(if upcalls { (0, 1) } else { (1, 0) }),
    ));
    Ok((checks, reports, run.log))
}

/// (MSI notifications, re-designation upcalls) on cpu 0 from the guest's report.
fn notifications(report: &str) -> Option<(u64, u64)> {
    let rest = report.strip_prefix("doorbell re-designation: ")?;
    let num_before = |marker: &str| -> Option<u64> {
        rest.split_once(marker)?.0.rsplit(' ').next()?.parse().ok()
    };
    Some((
        num_before(" notification(s) on cpu 0")?,
        num_before(" re-designation upcall(s)")?,
    ))
}

/// The count in the guest's "re-designation: ..., N events sent" report.
fn events_sent(report: &str) -> Option<u64> {
    let rest = report.strip_prefix("doorbell re-designation: ")?;
    let before = rest.split(" events sent").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

fn checks(g: Option<&GuestStats>, sent: Option<u64>) -> Vec<(String, bool)> {
    let Some(g) = g else {
        return vec![("the shim reported the guest".to_owned(), false)];
    };
    let mut c = vec![(
        "the guest's test passed (exit status 0)".to_owned(),
        g.exit_status == Some(0),
    )];
    let Some(sent) = sent else {
        c.push((
            "the guest reported how many events it sent".to_owned(),
            false,
        ));
        return c;
    };
    let mark = |label: u64| Some(g.mark(label)?.sink_events);
    let consumed = mark(0x301)
        .zip(mark(0x300))
        .map(|(a, b)| a.saturating_sub(b));
    c.push((
        format!("every event across the move consumed exactly once ({consumed:?} of {sent})"),
        consumed == Some(sent),
    ));
    let rejected = &g.doorbell.rejected;
    c.push((
        format!(
            "nothing rejected ({})",
            serde_json::to_string(rejected).unwrap_or_default()
        ),
        rejected.is_empty(),
    ));
    c.push(upcall_check(g.upcalls.as_ref()));
    c
}

/// With M3 upcalls offered (the shim's default) the one re-designation is
/// announced by a Redesignation upcall, which the guest acknowledges; without
/// them, by the MSI only (no upcall requested).
fn upcall_check(u: Option<&UpcallStats>) -> (String, bool) {
    let (req, del) = (
        u.map(|u| u.requested.redesignation),
        u.map(|u| u.delivered.redesignation),
    );
    if u.is_some_and(|u| u.offered) {
        (
            format!(
                "upcalls on: the re-designation upcall was requested and delivered once ({req:?}/{del:?})"
            ),
            req == Some(1) && del == Some(1),
        )
    } else {
        (
            format!("upcalls off: no re-designation upcall ({req:?})"),
            req.unwrap_or(0) == 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::stats::{self, mark};

    #[test]
    fn counts_must_match() {
        let r = "doorbell re-designation: monitor cpu 1 -> 0, 4000 events sent (0 while the notification was on its way), 1 notification(s) on cpu 0, 0 re-designation upcall(s) on cpu 0";
        assert_eq!(events_sent(r), Some(4000));
        assert_eq!(notifications(r), Some((1, 0)));
        assert_eq!(
            notifications("doorbell re-designation: 1 notification(s) on cpu 0"),
            None
        );
        let mut g = stats::sample("ktest");
        g.exit_status = Some(0);
        g.doorbell.rejected.clear();
        g.marks = vec![mark(0x300, 0, 10, 0), mark(0x301, 0, 4010, 0)];
        let u = g.upcalls.as_mut().unwrap();
        u.offered = true;
        (u.requested.redesignation, u.delivered.redesignation) = (1, 1);
        assert!(checks(Some(&g), Some(4000)).iter().all(|(_, ok)| *ok));
        // An upcall requested but never acknowledged fails the leg.
        g.upcalls.as_mut().unwrap().delivered.redesignation = 0;
        assert!(!checks(Some(&g), Some(4000)).iter().all(|(_, ok)| *ok));
        // Without upcalls the MSI announces it: nothing must be requested.
        g.upcalls = None;
        assert!(checks(Some(&g), Some(4000)).iter().all(|(_, ok)| *ok));
        assert!(!checks(Some(&g), Some(4001)).iter().all(|(_, ok)| *ok));
        assert!(!checks(Some(&g), None).iter().all(|(_, ok)| *ok));
    }
}
