//! Leg `shim-redesignate`: the shim moves a guest's doorbell range to another
//! host CPU's monitor at run time and notifies it (an M3 Redesignation upcall;
//! again with `--upcalls off`: the MSI on vector 0x34). Every event sent
//! across the move must be consumed exactly once.

use crate::error::Result;
use crate::scenario::redesignate::{self, Once};
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::vmm::stats::{GuestStats, UpcallStats};

/// ktest's re-designation test with and without upcalls.
pub struct ShimRedesignate;

impl Leg for ShimRedesignate {
    fn name(&self) -> &'static str {
        "shim-redesignate"
    }

    fn about(&self) -> &'static str {
        "the shim moves a guest's doorbell range to another host CPU's monitor at run time and notifies it (an M3 Redesignation upcall; again with --upcalls off: vector 0x34): every event across the move consumed exactly once"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        run(opts).unwrap_or_else(|e| LegRun::broken(e.to_string()))
    }
}

/// Runs the guest twice: with M3 upcalls (the shim's default; the
/// re-designation is announced by a Redesignation upcall) and with
/// `--upcalls off` (the MSI fallback on vector 0x34).
fn run(opts: &Options) -> Result<LegRun> {
    let on = redesignate::run_once(opts.timeout, true)?;
    let off = redesignate::run_once(opts.timeout, false)?;
    let mut checks = judge(&on, true);
    checks.extend(
        judge(&off, false)
            .into_iter()
            .map(|(what, ok)| (format!("--upcalls off: {what}"), ok)),
    );
    let mut reports = on.reports;
    reports.extend(
        off.reports
            .into_iter()
            .map(|r| format!("--upcalls off: {r}")),
    );
    Ok(LegRun::from_checks(&checks, reports, Some(on.run.log)))
}

/// One run's checks; `upcalls` says whether the shim offered them.
fn judge(once: &Once, upcalls: bool) -> Vec<(String, bool)> {
    let seen = once.seen;
    let mut checks = checks(once.run.guest_stats("ktest"), once.sent);
    // Which notification the guest saw: the upcall, or the MSI without upcalls.
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
    checks
}

/// The checks on the shim's counters: the test passed, every event sent was
/// consumed once, nothing rejected, the upcall as offered.
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
