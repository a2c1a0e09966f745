//! Runs the selected legs one after the other and closes with the summary,
//! whose last line is `N passed, M failed` over all of them, with
//! `, K skipped` when tests did not run (never counted as passed).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::infra::serial::Summary;
use crate::test::leg::{Images, Leg, Options};
use crate::test::verdict::LegOutcome;

/// One leg's result, as the summary shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegResult {
    pub name: &'static str,
    pub outcome: LegOutcome,
    pub duration: Duration,
    /// The guest's `report:` lines.
    pub reports: Vec<String>,
    pub log: Option<PathBuf>,
}

impl LegResult {
    #[must_use]
    pub fn line(&self) -> String {
        let counts = Summary {
            passed: self.outcome.passed,
            failed: self.outcome.failed,
            skipped: self.outcome.skipped,
        };
        format!(
            "leg {}: {counts} ({:.1} s)",
            self.name,
            self.duration.as_secs_f64()
        )
    }
}

/// Runs legs in order; guest images are built once and shared.
#[derive(Default)]
pub struct Runner {
    images: Images,
}

impl Runner {
    pub fn run(&mut self, leg: &dyn Leg, opts: &Options) -> LegResult {
        println!("== leg {}: {}", leg.name(), leg.about());
        let started = Instant::now();
        let found = leg.run(&mut self.images, opts);
        let result = LegResult {
            name: leg.name(),
            outcome: found.outcome,
            duration: started.elapsed(),
            reports: found.reports,
            log: found.log,
        };
        for problem in &result.outcome.problems {
            println!("{}: FAILED: {problem}", leg.name());
        }
        println!("{}", result.line());
        result
    }
}

/// Counts over all legs.
#[must_use]
pub fn total(results: &[LegResult]) -> Summary {
    results.iter().fold(Summary::default(), |acc, r| Summary {
        passed: acc.passed.saturating_add(r.outcome.passed),
        failed: acc.failed.saturating_add(r.outcome.failed),
        skipped: acc.skipped.saturating_add(r.outcome.skipped),
    })
}

/// The process exit code for a test run: 0 only if every leg passed.
#[must_use]
pub fn exit_code(results: &[LegResult]) -> u8 {
    u8::from(results.is_empty() || results.iter().any(|r| !r.outcome.ok()))
}

/// The closing summary; its last line is exactly `N passed, M failed`, or
/// `N passed, M failed, K skipped` when tests were skipped.
#[must_use]
pub fn summary_lines(results: &[LegResult]) -> Vec<String> {
    let mut lines = vec!["== summary".to_owned()];
    for result in results {
        lines.push(result.line());
        for report in &result.reports {
            lines.push(format!("  {} report: {report}", result.name));
        }
        for problem in &result.outcome.problems {
            lines.push(format!("  {}: {problem}", result.name));
        }
        if let (false, Some(log)) = (result.outcome.ok(), &result.log) {
            lines.push(format!("  {} log: {}", result.name, log.display()));
        }
    }
    lines.push(total(results).to_string());
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::process::Ending;
    use crate::infra::serial::SerialLog;
    use crate::test::verdict;
    use crate::vmm::exit::GuestExit;

    fn guest_result(name: &'static str, exit_code: i32, serial: &str) -> LegResult {
        let log = SerialLog::parse(serial.lines());
        let outcome = verdict::judge_guest(GuestExit::from_ending(Ending::Exited(exit_code)), &log);
        LegResult {
            name,
            outcome,
            duration: Duration::from_secs(3),
            reports: log.reports,
            log: None,
        }
    }

    const PASSING: &str = "\
[cpu0 INFO ] boot: main reached 900 us after entry (TSC)
test heap::vec ... ok
test smp::ipi ... ok
report: loop 10^6: ring3 0.7 ms, ring0 1300 ms
2 passed, 0 failed";

    /// A captured log with one deliberately failing in-guest test, and QEMU
    /// exit code 3 (guest status 1).
    const ONE_FAILING: &str = "\
[cpu0 INFO ] boot: main reached 900 us after entry (TSC)
test heap::vec ... ok
test deliberately::fails ... FAILED: ktest.rs:10: 1 + 1 == 3 failed: 2 != 3
test smp::ipi ... ok
2 passed, 1 failed";

    #[test]
    fn a_deliberately_failing_in_guest_test_makes_the_run_fail() {
        let unit = LegResult {
            name: "unit",
            outcome: verdict::judge_unit(Ending::Exited(0), Summary::new(10, 0), 2),
            duration: Duration::from_secs(1),
            reports: vec![],
            log: None,
        };
        let good = guest_result("guest-kvm", 1, PASSING);
        assert_eq!(exit_code(&[unit.clone(), good.clone()]), 0);

        let bad = guest_result("guest-tcg", 3, ONE_FAILING);
        assert!(!bad.outcome.ok());
        let results = [unit, bad, good];
        assert_ne!(exit_code(&results), 0);
        let lines = summary_lines(&results);
        assert_eq!(lines.last().unwrap(), "14 passed, 1 failed");
        assert!(
            lines.contains(&"leg guest-tcg: 2 passed, 1 failed (3.0 s)".to_owned()),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("guest-tcg: guest exit: status 1 (failure: tests failed)")),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_failed_line_fails_the_run_even_if_the_guest_claims_success() {
        let lying = guest_result("guest-tcg", 1, ONE_FAILING);
        assert_ne!(exit_code(&[lying]), 0);
    }

    #[test]
    fn a_hung_guest_counts_a_failure_in_the_total() {
        let hung = LegResult {
            name: "guest-kvm",
            outcome: verdict::judge_guest(
                GuestExit::TimedOut,
                &SerialLog::parse(["test a ... ok"]),
            ),
            duration: Duration::from_mins(2),
            reports: vec![],
            log: Some(PathBuf::from("target/xtask/logs/guest-kvm-x.log")),
        };
        let lines = summary_lines(&[guest_result("guest-tcg", 1, PASSING), hung.clone()]);
        assert_eq!(lines.last().unwrap(), "3 passed, 1 failed");
        assert!(
            lines
                .iter()
                .any(|l| l == "  guest-kvm log: target/xtask/logs/guest-kvm-x.log")
        );
        assert_ne!(exit_code(&[hung]), 0);
    }

    #[test]
    fn reports_are_shown_per_leg() {
        let lines = summary_lines(&[guest_result("guest-tcg", 1, PASSING)]);
        assert!(
            lines
                .contains(&"  guest-tcg report: loop 10^6: ring3 0.7 ms, ring0 1300 ms".to_owned()),
            "{lines:#?}"
        );
        assert_eq!(lines.last().unwrap(), "2 passed, 0 failed");
    }

    #[test]
    fn skips_are_totalled_apart_from_passes() {
        const SKIPPING: &str = "\
test heap::vec ... ok
test ctrl::shadow ... skipped: not offered: M4 shadowed control flags
1 passed, 0 failed, 1 skipped";
        let r = guest_result("guest-kvm", 1, SKIPPING);
        assert_eq!(
            r.line(),
            "leg guest-kvm: 1 passed, 0 failed, 1 skipped (3.0 s)"
        );
        let lines = summary_lines(&[r, guest_result("guest-tcg", 1, PASSING)]);
        assert_eq!(lines.last().unwrap(), "3 passed, 0 failed, 1 skipped");
    }

    #[test]
    fn nothing_run_is_not_success() {
        assert_ne!(exit_code(&[]), 0);
    }
}
