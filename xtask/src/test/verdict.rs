//! Turning what happened into pass/fail: QEMU's exit code, and a whole
//! in-guest test run (exit code plus serial log).

use crate::infra::process::Ending;
use crate::infra::serial::{SerialLog, Summary};
use crate::vmm::exit::GuestExit;

/// The result of one leg: counts, and why it failed if it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegOutcome {
    pub passed: u32,
    pub failed: u32,
    /// Tests that did not run; never counted as passed.
    pub skipped: u32,
    /// Reasons the leg failed beyond failing tests (crash, timeout, ...).
    pub problems: Vec<String>,
}

impl LegOutcome {
    /// A leg that could not run at all: one failure.
    pub fn broken(reason: impl Into<String>) -> Self {
        Self {
            passed: 0,
            failed: 1,
            skipped: 0,
            problems: vec![reason.into()],
        }
    }

    #[must_use]
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.problems.is_empty()
    }

    /// A leg with problems counts at least one failure.
    fn settle(mut self) -> Self {
        if !self.problems.is_empty() && self.failed == 0 {
            self.failed = 1;
        }
        self
    }
}

/// Judges an in-guest test run. It passes only if the guest reported
/// status 0, the summary line was seen, it agrees with the test lines, at
/// least one test ran, and nothing failed.
#[must_use]
pub fn judge_guest(exit: GuestExit, log: &SerialLog) -> LegOutcome {
    let counted = log.counted();
    let mut problems = Vec::new();
    if !exit.passed() {
        problems.push(format!("guest exit: {exit}"));
    }
    let mut failed = counted.failed;
    match log.summary {
        None => {
            problems.push("no summary line `N passed, M failed` on the serial console".to_owned());
        }
        Some(summary) if summary != counted => {
            problems.push(format!(
                "summary line says {} but the test lines show {}",
                show(summary),
                show(counted)
            ));
            failed = failed.max(summary.failed);
        }
        Some(_) => {}
    }
    if exit.passed() && counted.failed > 0 {
        problems.push("guest exited with status 0 although tests failed".to_owned());
    }
    if counted.ran() == 0 {
        problems.push(format!(
            "no in-guest test ran ({} skipped): a suite that runs nothing proves nothing",
            counted.skipped
        ));
    }
    LegOutcome {
        passed: counted.passed,
        failed,
        skipped: counted.skipped,
        problems,
    }
    .settle()
}

/// The names of the failed checks.
#[must_use]
pub fn failed_checks(checks: &[(String, bool)]) -> Vec<&str> {
    checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name.as_str())
        .collect()
}

/// `Ok` when every check passed, else an error naming `what` and the failures.
pub fn require_all(what: &str, checks: &[(String, bool)]) -> crate::error::Result<()> {
    let failed = failed_checks(checks);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(crate::error::Error::failed(format!(
            "{what}: {}",
            failed.join("; ")
        )))
    }
}

/// Judges a leg made of named host-side checks: each is one test, and a leg
/// with none checked nothing, which fails it.
#[must_use]
pub fn judge_checks(checks: &[(String, bool)]) -> LegOutcome {
    let passed = checks.iter().filter(|(_, ok)| *ok).count();
    let mut problems: Vec<String> = failed_checks(checks)
        .iter()
        .map(|name| format!("check failed: {name}"))
        .collect();
    if checks.is_empty() {
        problems.push("the leg made no check".to_owned());
    }
    LegOutcome {
        passed: u32::try_from(passed).unwrap_or(u32::MAX),
        failed: u32::try_from(checks.len() - passed).unwrap_or(u32::MAX),
        skipped: 0,
        problems,
    }
    .settle()
}

fn show(s: Summary) -> String {
    s.to_string()
}

/// Judges the host unit tests from cargo's exit code and summed results.
#[must_use]
pub fn judge_unit(ending: Ending, totals: Summary, result_lines: usize) -> LegOutcome {
    let mut problems = Vec::new();
    match ending {
        Ending::Exited(0) => {}
        Ending::Exited(code) => problems.push(format!("cargo test exited with code {code}")),
        Ending::Signalled(signal) => {
            problems.push(format!("cargo test was killed by signal {signal}"));
        }
        Ending::TimedOut => problems.push("cargo test timed out and was killed".to_owned()),
    }
    if result_lines == 0 {
        problems.push("cargo test printed no `test result:` line (did it compile?)".to_owned());
    } else if totals.ran() == 0 {
        problems.push(format!(
            "cargo test ran no test ({} ignored): a leg that runs nothing proves nothing",
            totals.skipped
        ));
    }
    LegOutcome {
        passed: totals.passed,
        failed: totals.failed,
        skipped: totals.skipped,
        problems,
    }
    .settle()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[&str]) -> SerialLog {
        SerialLog::parse(lines.iter().copied())
    }

    #[test]
    fn a_clean_run_passes() {
        let outcome = judge_guest(
            GuestExit::Status(0),
            &log(&["test a ... ok", "test b ... ok", "2 passed, 0 failed"]),
        );
        assert_eq!(
            outcome,
            LegOutcome {
                passed: 2,
                failed: 0,
                skipped: 0,
                problems: vec![]
            }
        );
        assert!(outcome.ok());
    }

    #[test]
    fn a_failing_in_guest_test_fails_the_leg() {
        let outcome = judge_guest(
            GuestExit::from_ending(Ending::Exited(3)),
            &log(&[
                "test a ... ok",
                "test b ... FAILED: b.rs:3: 1 != 2",
                "1 passed, 1 failed",
            ]),
        );
        assert!(!outcome.ok());
        assert_eq!((outcome.passed, outcome.failed), (1, 1));
        assert!(
            outcome.problems[0].contains("tests failed"),
            "{:?}",
            outcome.problems
        );
    }

    #[test]
    fn a_missing_summary_fails_even_with_status_0() {
        let outcome = judge_guest(GuestExit::Status(0), &log(&["test a ... ok"]));
        assert!(!outcome.ok());
        assert_eq!(outcome.failed, 1);
        assert!(outcome.problems[0].contains("no summary line"));
    }

    #[test]
    fn a_summary_that_disagrees_with_the_test_lines_fails() {
        let outcome = judge_guest(
            GuestExit::Status(0),
            &log(&["test a ... ok", "2 passed, 0 failed"]),
        );
        assert!(!outcome.ok());
        assert!(outcome.problems[0].contains(
            "summary line says 2 passed, 0 failed but the test lines show 1 passed, 0 failed"
        ));
        let outcome = judge_guest(
            GuestExit::Status(1),
            &log(&["test a ... ok", "1 passed, 2 failed"]),
        );
        assert_eq!(outcome.failed, 2);
    }

    #[test]
    fn status_0_with_failed_tests_still_fails() {
        let outcome = judge_guest(
            GuestExit::Status(0),
            &log(&["test a ... FAILED: x", "0 passed, 1 failed"]),
        );
        assert!(!outcome.ok());
        assert_eq!(outcome.failed, 1);
    }

    #[test]
    fn crashes_hangs_and_triple_faults_count_a_failure() {
        let good_log = log(&["test a ... ok", "1 passed, 0 failed"]);
        for exit in [
            GuestExit::Status(2),
            GuestExit::Status(3),
            GuestExit::QemuZero,
            GuestExit::TimedOut,
            GuestExit::Signalled(9),
        ] {
            let outcome = judge_guest(exit, &good_log);
            assert!(!outcome.ok(), "{exit}");
            assert_eq!(outcome.failed, 1, "{exit}");
        }
        let outcome = judge_guest(GuestExit::TimedOut, &log(&["hanging"]));
        assert_eq!(outcome.failed, 1);
        // The timeout, the missing summary, and no test having run.
        assert_eq!(outcome.problems.len(), 3);
    }

    #[test]
    fn skips_are_counted_apart_and_a_run_of_skips_fails() {
        let outcome = judge_guest(
            GuestExit::Status(0),
            &log(&[
                "test a ... ok",
                "test b ... skipped: not offered: M3 upcalls",
                "1 passed, 0 failed, 1 skipped",
            ]),
        );
        assert!(outcome.ok(), "{outcome:?}");
        assert_eq!((outcome.passed, outcome.skipped), (1, 1));
        let outcome = judge_guest(
            GuestExit::Status(1),
            &log(&[
                "test b ... skipped: not offered: M3 upcalls",
                "0 passed, 0 failed, 1 skipped",
            ]),
        );
        assert!(!outcome.ok());
        assert_eq!(outcome.passed, 0, "a skip is no pass");
        assert!(
            outcome
                .problems
                .iter()
                .any(|p| p.contains("no in-guest test ran")),
            "{outcome:?}"
        );
        // Even a guest claiming success proves nothing by running nothing.
        let outcome = judge_guest(GuestExit::Status(0), &log(&["0 passed, 0 failed"]));
        assert!(!outcome.ok());
    }

    #[test]
    fn a_leg_without_checks_fails() {
        let outcome = judge_checks(&[]);
        assert!(!outcome.ok());
        assert_eq!(outcome.failed, 1);
        assert!(judge_checks(&[("x".into(), true)]).ok());
    }

    #[test]
    fn unit_judgement() {
        let s = Summary::new;
        assert!(judge_unit(Ending::Exited(0), s(10, 0), 3).ok());
        let outcome = judge_unit(Ending::Exited(101), s(9, 1), 3);
        assert_eq!((outcome.passed, outcome.failed), (9, 1));
        assert!(!outcome.ok());
        // Did not compile: no result lines, still at least one failure.
        let outcome = judge_unit(Ending::Exited(101), s(0, 0), 0);
        assert_eq!(outcome.failed, 1);
        assert!(!outcome.ok());
        assert!(!judge_unit(Ending::Exited(0), s(0, 0), 0).ok());
        // It compiled, and ran nothing (a filter, or only ignored tests).
        let ignored = Summary {
            skipped: 1,
            ..s(0, 0)
        };
        let outcome = judge_unit(Ending::Exited(0), ignored, 1);
        assert!(!outcome.ok());
        assert!(outcome.problems[0].contains("ran no test"), "{outcome:?}");
        assert!(!judge_unit(Ending::TimedOut, s(5, 0), 1).ok());
    }
}
