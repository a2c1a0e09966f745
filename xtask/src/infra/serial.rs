//! The guest's serial protocol, line by line:
//!
//! - `test NAME ... ok` / `test NAME ... FAILED: REASON` /
//!   `test NAME ... skipped: REASON`: one in-guest test (a skipped one did
//!   not run: it is never counted as passed);
//! - `N passed, M failed, K skipped` (or, from older images, `N passed,
//!   M failed`) alone on a line: the end of the in-guest suite;
//! - `report: ...`: a measurement the guest wants shown;
//! - a line containing `boot: main reached`, e.g. `... 1234 us after entry (TSC)`.
//!
//! Each of these may follow a log prefix such as `[cpu0 INFO ] `; everything
//! else is ordinary console output.

pub const BOOT_MARKER: &str = "boot: main reached";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
    /// The test did not run; the guest's reason.
    Skipped(String),
}

/// The start of a skip reason that says the host lacks what the test
/// exercises (the guest's `ktest::NOT_OFFERED`).
pub const NOT_OFFERED: &str = "not offered: ";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestLine {
    pub name: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

impl Summary {
    #[cfg(test)]
    #[must_use]
    pub const fn new(passed: u32, failed: u32) -> Self {
        Self {
            passed,
            failed,
            skipped: 0,
        }
    }

    /// Tests that ran: passed or failed (skipped ones did not).
    #[must_use]
    pub const fn ran(&self) -> u32 {
        self.passed.saturating_add(self.failed)
    }
}

impl std::fmt::Display for Summary {
    /// `N passed, M failed`, and `, K skipped` when some were.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.skipped > 0 {
            write!(f, ", {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

/// What one serial line means.
#[derive(Debug, Clone, PartialEq)]
pub enum LineKind {
    Test(TestLine),
    Summary(Summary),
    /// The text after `report: `.
    Report(String),
    /// The boot marker, with the guest's own microseconds figure if present.
    Boot {
        tsc_us: Option<f64>,
    },
    Other,
}

/// Everything of interest in a whole serial log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SerialLog {
    pub tests: Vec<TestLine>,
    /// The last summary line seen.
    pub summary: Option<Summary>,
    pub reports: Vec<String>,
    /// Index of the first boot-marker line and the guest's TSC figure.
    pub boot: Option<(usize, Option<f64>)>,
}

impl SerialLog {
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Self {
        let mut log = Self::default();
        for (index, line) in lines.into_iter().enumerate() {
            match classify(line) {
                LineKind::Test(test) => log.tests.push(test),
                LineKind::Summary(summary) => log.summary = Some(summary),
                LineKind::Report(text) => log.reports.push(text),
                LineKind::Boot { tsc_us } => {
                    if log.boot.is_none() {
                        log.boot = Some((index, tsc_us));
                    }
                }
                LineKind::Other => {}
            }
        }
        log
    }

    /// Counts of `ok`, `FAILED` and `skipped` test lines.
    #[must_use]
    pub fn counted(&self) -> Summary {
        let count =
            |f: fn(&Outcome) -> bool| saturate(self.tests.iter().filter(|t| f(&t.outcome)).count());
        Summary {
            passed: count(|o| *o == Outcome::Ok),
            failed: count(|o| matches!(o, Outcome::Failed(_))),
            skipped: count(|o| matches!(o, Outcome::Skipped(_))),
        }
    }

    /// The tests skipped because the host did not offer what they exercise.
    #[must_use]
    pub fn skipped_not_offered(&self) -> Vec<&TestLine> {
        self.tests
            .iter()
            .filter(|t| matches!(&t.outcome, Outcome::Skipped(why) if why.starts_with(NOT_OFFERED)))
            .collect()
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Classifies one serial line (line ending already removed).
#[must_use]
pub fn classify(line: &str) -> LineKind {
    if let Some(at) = line.find(BOOT_MARKER) {
        return LineKind::Boot {
            tsc_us: micros_after(&line[at + BOOT_MARKER.len()..]),
        };
    }
    let body = strip_log_prefix(line.trim_end());
    if let Some(text) = body.strip_prefix("report: ") {
        return LineKind::Report(text.trim().to_owned());
    }
    if let Some(test) = parse_test_line(body) {
        return LineKind::Test(test);
    }
    if let Some(summary) = parse_summary(body) {
        return LineKind::Summary(summary);
    }
    LineKind::Other
}

/// Drops one leading `[...]` log prefix, if any.
fn strip_log_prefix(line: &str) -> &str {
    let line = line.trim_start();
    if line.starts_with('[')
        && let Some(end) = line.find(']')
    {
        return line[end + 1..].trim_start();
    }
    line
}

fn parse_test_line(body: &str) -> Option<TestLine> {
    let rest = body.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let outcome = if result == "ok" {
        Outcome::Ok
    } else if let Some(reason) = result.strip_prefix("FAILED") {
        let reason = reason.strip_prefix(':').unwrap_or(reason).trim();
        Outcome::Failed(reason.to_owned())
    } else if let Some(reason) = result.strip_prefix("skipped") {
        let reason = reason.strip_prefix(':').unwrap_or(reason).trim();
        Outcome::Skipped(reason.to_owned())
    } else {
        return None;
    };
    Some(TestLine {
        name: name.to_owned(),
        outcome,
    })
}

/// `N passed, M failed` or `N passed, M failed, K skipped`, and nothing else.
fn parse_summary(body: &str) -> Option<Summary> {
    let (passed, rest) = body.split_once(" passed, ")?;
    let (failed, skipped) = match rest.split_once(" failed, ") {
        Some((failed, skipped)) => (failed, parse_count(skipped.strip_suffix(" skipped")?)?),
        None => (rest.strip_suffix(" failed")?, 0),
    };
    Some(Summary {
        passed: parse_count(passed)?,
        failed: parse_count(failed)?,
        skipped,
    })
}

fn parse_count(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The first `<number> us` in `text`.
fn micros_after(text: &str) -> Option<f64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words.windows(2).find_map(|pair| {
        let unit = pair[1].trim_end_matches([',', ';', '.']);
        if unit == "us" || unit == "µs" {
            pair[0].parse::<f64>().ok().filter(|v| v.is_finite())
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_and_failed_test_lines() {
        assert_eq!(
            classify("test heap::vec_box ... ok"),
            LineKind::Test(TestLine {
                name: "heap::vec_box".into(),
                outcome: Outcome::Ok
            })
        );
        assert_eq!(
            classify("test irq::vif ... FAILED: irq.rs:40: no interrupt after 10 ms"),
            LineKind::Test(TestLine {
                name: "irq::vif".into(),
                outcome: Outcome::Failed("irq.rs:40: no interrupt after 10 ms".into())
            })
        );
        // Through the log facade, with a Windows line ending left over.
        assert_eq!(
            classify("[cpu1 INFO ] test smp::ipi ... ok \r"),
            LineKind::Test(TestLine {
                name: "smp::ipi".into(),
                outcome: Outcome::Ok
            })
        );
        assert_eq!(
            classify("test x ... FAILED"),
            LineKind::Test(TestLine {
                name: "x".into(),
                outcome: Outcome::Failed(String::new())
            })
        );
    }

    #[test]
    fn skipped_test_lines_keep_their_reason() {
        assert_eq!(
            classify("test ctrl::x ... skipped: not offered: M4 shadowed control flags"),
            LineKind::Test(TestLine {
                name: "ctrl::x".into(),
                outcome: Outcome::Skipped("not offered: M4 shadowed control flags".into())
            })
        );
        let log = SerialLog::parse([
            "test a ... ok",
            "test b ... skipped: not offered: M3 upcalls",
            "test c ... skipped: not asked for: notify.bench",
            "1 passed, 0 failed, 2 skipped",
        ]);
        assert_eq!(
            log.counted(),
            Summary {
                passed: 1,
                failed: 0,
                skipped: 2
            }
        );
        assert_eq!(log.summary, Some(log.counted()));
        let names: Vec<&str> = log
            .skipped_not_offered()
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(names, ["b"]);
        assert_eq!(log.counted().to_string(), "1 passed, 0 failed, 2 skipped");
        assert_eq!(Summary::new(3, 1).to_string(), "3 passed, 1 failed");
    }

    #[test]
    fn lines_that_only_look_like_tests_are_ordinary_output() {
        assert_eq!(classify("test two words ... ok"), LineKind::Other);
        assert_eq!(classify("test heap ... ignored"), LineKind::Other);
        assert_eq!(classify("test heap ok"), LineKind::Other);
        assert_eq!(classify("running test heap ... ok"), LineKind::Other);
    }

    #[test]
    fn the_summary_line_must_stand_alone() {
        assert_eq!(
            classify("20 passed, 0 failed"),
            LineKind::Summary(Summary::new(20, 0))
        );
        assert_eq!(
            classify("[cpu0 INFO ] 3 passed, 1 failed"),
            LineKind::Summary(Summary::new(3, 1))
        );
        assert_eq!(
            classify("3 passed, 1 failed, 2 skipped"),
            LineKind::Summary(Summary {
                passed: 3,
                failed: 1,
                skipped: 2
            })
        );
        assert_eq!(classify("3 passed, 1 failed, x skipped"), LineKind::Other);
        assert_eq!(classify("3 passed, 1 failed, 2 skipped!"), LineKind::Other);
        assert_eq!(classify("so far 3 passed, 1 failed"), LineKind::Other);
        assert_eq!(classify("3 passed, 1 failed tests"), LineKind::Other);
        assert_eq!(classify("-3 passed, 1 failed"), LineKind::Other);
        // cargo's own summary is not the guest's.
        assert_eq!(
            classify("test result: ok. 3 passed; 0 failed; 0 ignored"),
            LineKind::Other
        );
    }

    #[test]
    fn report_lines_keep_their_text() {
        assert_eq!(
            classify("report: loop 10^6 iterations: ring3 0.6 ms, ring0 4100 ms"),
            LineKind::Report("loop 10^6 iterations: ring3 0.6 ms, ring0 4100 ms".into())
        );
        assert_eq!(
            classify("[cpu0 INFO ] report: x"),
            LineKind::Report("x".into())
        );
        assert_eq!(classify("reporting: x"), LineKind::Other);
    }

    #[test]
    fn boot_marker_with_and_without_tsc_figure() {
        assert_eq!(
            classify("[cpu0 INFO ] boot: main reached 1234 us after entry (TSC)"),
            LineKind::Boot {
                tsc_us: Some(1234.0)
            }
        );
        assert_eq!(
            classify("boot: main reached, 17.5 us after entry (TSC)"),
            LineKind::Boot { tsc_us: Some(17.5) }
        );
        assert_eq!(
            classify("boot: main reached"),
            LineKind::Boot { tsc_us: None }
        );
        assert_eq!(
            classify("boot: main reached at 99 ms"),
            LineKind::Boot { tsc_us: None }
        );
    }

    #[test]
    fn a_whole_log() {
        let log = SerialLog::parse([
            "[cpu0 INFO ] pvh: 256 MiB",
            "[cpu0 INFO ] boot: main reached 800 us after entry (TSC)",
            "test a ... ok",
            "test b ... FAILED: boom",
            "report: r1",
            "test c ... ok",
            "2 passed, 1 failed",
        ]);
        assert_eq!(log.tests.len(), 3);
        assert_eq!(log.counted(), Summary::new(2, 1));
        assert_eq!(log.summary, Some(Summary::new(2, 1)));
        assert_eq!(log.reports, ["r1"]);
        assert_eq!(log.boot, Some((1, Some(800.0))));
    }

    #[test]
    fn a_log_without_summary_or_marker() {
        let log = SerialLog::parse(["test a ... ok", "PANIC at x.rs:1"]);
        assert_eq!(log.summary, None);
        assert_eq!(log.boot, None);
        assert_eq!(log.counted(), Summary::new(1, 0));
    }
}
