//! The re-designation scenario (leg `shim-redesignate`): ktest's
//! `doorbell_redesignation_keeps_every_event` under the shim with
//! `--doorbell-redesignate`: the guest sends sink events, asks the shim
//! (hypercall 21) to move its range to the spare range of another host CPU's
//! monitor, is told by the designation notification (an M3 Redesignation
//! upcall, or vector 0x34 without upcalls), moves, and sends more. Its
//! stats marks 0x300 and 0x301 bracket the events sent across the move.

use std::time::Duration;

use crate::error::Result;
use crate::{infra::build, vmm::shim};

/// Runs the guest once, with or without upcalls.
pub fn run_once(timeout: Duration, upcalls: bool) -> Result<Once> {
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
    Ok(Once {
        sent: reports.iter().find_map(|r| events_sent(r)),
        seen: reports.iter().find_map(|r| notifications(r)),
        reports,
        run,
    })
}

/// What one run gave.
#[derive(Debug)]
pub struct Once {
    /// The guest's `report:` lines.
    pub reports: Vec<String>,
    /// Sink events the guest says it sent across the move.
    pub sent: Option<u64>,
    /// (MSIs, upcalls) the guest took on cpu 0 for the move.
    pub seen: Option<(u64, u64)>,
    pub run: shim::Run,
}

/// (notifications, re-designation upcalls) on cpu 0 from the guest's report.
pub fn notifications(report: &str) -> Option<(u64, u64)> {
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
pub fn events_sent(report: &str) -> Option<u64> {
    let rest = report.strip_prefix("doorbell re-designation: ")?;
    let before = rest.split(" events sent").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_must_match() {
        let r = "doorbell re-designation: monitor cpu 1 -> 0, 4000 events sent (0 while the notification was on its way), 1 notification(s) on cpu 0, 0 re-designation upcall(s) on cpu 0";
        assert_eq!(events_sent(r), Some(4000));
        assert_eq!(notifications(r), Some((1, 0)));
        assert_eq!(
            notifications("doorbell re-designation: 1 notification(s) on cpu 0"),
            None
        );
    }
}
